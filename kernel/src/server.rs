//! The Jupyter server: sockets, the shell and control loops (which never block on a running
//! cell) and the single iopub writer. Cells run on the executor thread (`executor.rs`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use jupyter_protocol::{ConnectionInfo, JupyterMessage, JupyterMessageContent};
use jupyter_zmq_client as zmq;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::comms::Comms;
use crate::engine::Engine;
use crate::executor::{self, Request};
use crate::interrupt::InterruptFile;
use crate::messages::{child, comm_message, status};
use crate::slot::Slot;

/// A cell that ignores an interrupt this long is killed (its variables are lost).
fn interrupt_grace() -> Duration {
    seconds_from_env("PEFT_KERNEL_INTERRUPT_GRACE_S", 10.0)
}

/// How long a shutdown waits for background runs to stop and save.
fn background_grace() -> Duration {
    seconds_from_env("PEFT_KERNEL_BACKGROUND_GRACE_S", 120.0)
}

/// Seconds from the variable `name` (tests shorten the waits), else `default`.
fn seconds_from_env(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

/// State shared by the loops and the executor.
pub struct Shared {
    pub iopub: UnboundedSender<JupyterMessage>,
    pub shell_out: UnboundedSender<JupyterMessage>,
    /// `None` until the prelude is loaded; locked by the executor while a cell runs.
    pub engine: Mutex<Option<Engine>>,
    /// The cell process, for killing a cell that ignores an interrupt.
    pub process: Mutex<Option<Arc<Mutex<std::process::Child>>>>,
    pub interrupt: InterruptFile,
    /// Sequence number of the running request (0: none).
    pub running: AtomicU64,
    /// Requests numbered below this are answered "aborted" (set by interrupts and errors).
    pub abort_below: AtomicU64,
    /// The last request number handed out.
    pub last_seq: AtomicU64,
    /// The running cell was interrupted / killed.
    pub interrupted: AtomicBool,
    pub killed: AtomicBool,
    pub history: Mutex<Vec<(usize, String)>>,
    /// The latest cargo progress line while the prelude loads.
    pub cargo_status: Arc<Mutex<String>>,
    /// The widgets' comms and their state (shared with the cell process through files).
    pub comms: Arc<Comms>,
}

pub fn serve(connection_file: &Path, slot: Slot, cargo_status: Arc<Mutex<String>>) -> Result<()> {
    let text = std::fs::read_to_string(connection_file)
        .with_context(|| format!("reading {}", connection_file.display()))?;
    let info: ConnectionInfo =
        serde_json::from_str(&text).context("parsing the connection file")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(info, slot, cargo_status))
}

async fn run(info: ConnectionInfo, slot: Slot, cargo_status: Arc<Mutex<String>>) -> Result<()> {
    let session = uuid::Uuid::new_v4().to_string();
    let mut iopub = zmq::create_kernel_iopub_connection(&info, &session).await?;
    let shell = zmq::create_kernel_shell_connection(&info, &session).await?;
    let mut control = zmq::create_kernel_control_connection(&info, &session).await?;
    let mut heartbeat = zmq::create_kernel_heartbeat_connection(&info).await?;
    let _stdin = zmq::create_kernel_stdin_connection(&info, &session).await?;

    let (iopub_tx, mut iopub_rx) = unbounded_channel::<JupyterMessage>();
    let (shell_tx, mut shell_rx) = unbounded_channel::<JupyterMessage>();
    let (mut shell_send, mut shell_recv) = shell.split();

    tokio::spawn(async move { while heartbeat.single_heartbeat().await.is_ok() {} });
    tokio::spawn(async move {
        while let Some(msg) = iopub_rx.recv().await {
            if let Err(e) = iopub.send(msg).await {
                eprintln!("peft-kernel: iopub send failed: {e}");
            }
        }
    });
    tokio::spawn(async move {
        while let Some(msg) = shell_rx.recv().await {
            if let Err(e) = shell_send.send(msg).await {
                eprintln!("peft-kernel: shell send failed: {e}");
            }
        }
    });

    let shared = Arc::new(Shared {
        iopub: iopub_tx,
        shell_out: shell_tx,
        engine: Mutex::new(None),
        process: Mutex::new(None),
        interrupt: InterruptFile::new(&slot.interrupt_file()).counting_in(&slot.state_dir()),
        running: AtomicU64::new(0),
        abort_below: AtomicU64::new(0),
        last_seq: AtomicU64::new(0),
        interrupted: AtomicBool::new(false),
        killed: AtomicBool::new(false),
        history: Mutex::new(vec![]),
        cargo_status,
        comms: Arc::new(Comms::new(&slot.state_dir())),
    });
    let requests = executor::spawn(Arc::clone(&shared), slot);

    // Control: answered at once, whatever the shell is doing.
    let control_shared = Arc::clone(&shared);
    tokio::spawn(async move {
        loop {
            let msg = match control.read().await {
                Ok(msg) => msg,
                Err(e) => {
                    eprintln!("peft-kernel: control read failed: {e}");
                    continue;
                }
            };
            let shared = &control_shared;
            let _ = shared.iopub.send(status(&msg, "busy"));
            let (reply, exit) = handle_control(shared, &msg);
            if let Some(reply) = reply {
                let _ = control.send(reply).await;
            }
            let _ = shared.iopub.send(status(&msg, "idle"));
            if exit {
                // Background runs stop after their current step (and checkpoint when their
                // output_dir asks for it) before the cell process ends.
                shared.interrupt.raise();
                let deadline = std::time::Instant::now() + background_grace();
                while shared.comms.runs_active() && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Let the iopub writer drain, then end the cell process and ourselves.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(p) = shared.process.lock().unwrap().as_ref() {
                    let _ = p.lock().unwrap().kill();
                }
                std::process::exit(0);
            }
        }
    });

    // Shell: execute requests are queued for the executor; everything else is answered here.
    loop {
        let msg = match shell_recv.read().await {
            Ok(msg) => msg,
            Err(e) => {
                eprintln!("peft-kernel: shell read failed: {e}");
                continue;
            }
        };
        if let JupyterMessageContent::ExecuteRequest(_) = &msg.content {
            let seq = shared.last_seq.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = requests.send(Request { seq, msg });
            continue;
        }
        let shared = Arc::clone(&shared);
        // Completion and inspection may take a while in rust-analyzer: off the loop.
        tokio::task::spawn_blocking(move || {
            let _ = shared.iopub.send(status(&msg, "busy"));
            if let Some(reply) = handle_shell(&shared, &msg) {
                let _ = shared.shell_out.send(reply);
            }
            let _ = shared.iopub.send(status(&msg, "idle"));
        });
    }
}

pub fn kernel_info_content() -> Value {
    json!({
        "status": "ok",
        "protocol_version": "5.3",
        "implementation": "peft-kernel",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {
            "name": "rust",
            "version": "",
            "mimetype": "text/rust",
            "file_extension": ".rs",
            "pygments_lexer": "rust",
            "codemirror_mode": "rust",
        },
        "banner": "Rust (PEFT): evcxr with peft_prelude preloaded",
        "help_links": [],
        "debugger": false,
    })
}

fn handle_control(shared: &Arc<Shared>, msg: &JupyterMessage) -> (Option<JupyterMessage>, bool) {
    match &msg.content {
        JupyterMessageContent::KernelInfoRequest(_) => (
            Some(child(msg, "kernel_info_reply", kernel_info_content())),
            false,
        ),
        JupyterMessageContent::ShutdownRequest(req) => {
            let reply = json!({ "status": "ok", "restart": req.restart });
            (Some(child(msg, "shutdown_reply", reply)), true)
        }
        JupyterMessageContent::InterruptRequest(_) => {
            interrupt(shared);
            (
                Some(child(msg, "interrupt_reply", json!({ "status": "ok" }))),
                false,
            )
        }
        _ => {
            eprintln!(
                "peft-kernel: ignoring control message {}",
                msg.header.msg_type
            );
            (None, false)
        }
    }
}

/// Raises the interrupt flag, drops queued cells, and kills the running cell if it ignores the
/// interrupt for the grace period (or on a second interrupt).
fn interrupt(shared: &Arc<Shared>) {
    shared.interrupt.raise();
    let last = shared.last_seq.load(Ordering::SeqCst);
    shared.abort_below.fetch_max(last + 1, Ordering::SeqCst);
    let running = shared.running.load(Ordering::SeqCst);
    if running == 0 {
        return;
    }
    if shared.interrupted.swap(true, Ordering::SeqCst) {
        kill_cell(shared, running);
        return;
    }
    let grace = interrupt_grace();
    let shared = Arc::clone(shared);
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        kill_cell(&shared, running);
    });
}

fn kill_cell(shared: &Shared, running: u64) {
    if shared.running.load(Ordering::SeqCst) != running {
        return;
    }
    if let Some(p) = shared.process.lock().unwrap().as_ref() {
        shared.killed.store(true, Ordering::SeqCst);
        eprintln!("peft-kernel: the cell ignored the interrupt; killing its process");
        let _ = p.lock().unwrap().kill();
    }
}

fn handle_shell(shared: &Shared, msg: &JupyterMessage) -> Option<JupyterMessage> {
    let reply = |t: &str, content: Value| Some(child(msg, t, content));
    match &msg.content {
        JupyterMessageContent::KernelInfoRequest(_) => {
            reply("kernel_info_reply", kernel_info_content())
        }
        JupyterMessageContent::IsCompleteRequest(req) => {
            let (status, indent) = crate::complete::is_complete(&req.code);
            let mut content = json!({ "status": status });
            if status == "incomplete" {
                content["indent"] = json!(indent);
            }
            reply("is_complete_reply", content)
        }
        JupyterMessageContent::CompleteRequest(req) => reply(
            "complete_reply",
            complete(shared, &req.code, req.cursor_pos),
        ),
        JupyterMessageContent::InspectRequest(req) => {
            reply("inspect_reply", inspect(shared, &req.code, req.cursor_pos))
        }
        JupyterMessageContent::CommInfoRequest(req) => reply(
            "comm_info_reply",
            shared.comms.info(req.target_name.as_deref()),
        ),
        JupyterMessageContent::HistoryRequest(req) => reply("history_reply", history(shared, req)),
        JupyterMessageContent::ShutdownRequest(req) => reply(
            "shutdown_reply",
            json!({ "status": "ok", "restart": req.restart }),
        ),
        // Widgets: handled here, while a cell runs too; the running cell reads the state the
        // page set from the side channel.
        JupyterMessageContent::CommOpen(open) => {
            for r in shared.comms.page_open(&open.comm_id.0, &open.target_name) {
                let _ = shared.iopub.send(comm_message(msg, r));
            }
            None
        }
        JupyterMessageContent::CommMsg(m) => {
            let data = Value::Object(m.data.clone());
            for r in shared.comms.page_msg(&m.comm_id.0, &data) {
                let _ = shared.iopub.send(comm_message(msg, r));
            }
            None
        }
        JupyterMessageContent::CommClose(c) => {
            shared.comms.page_close(&c.comm_id.0);
            None
        }
        _ => {
            eprintln!(
                "peft-kernel: ignoring shell message {}",
                msg.header.msg_type
            );
            None
        }
    }
}

/// Jupyter counts cursor positions in code points; evcxr wants byte offsets.
fn byte_offset(code: &str, chars: usize) -> usize {
    code.char_indices()
        .nth(chars)
        .map(|(i, _)| i)
        .unwrap_or(code.len())
}

fn char_offset(code: &str, bytes: usize) -> usize {
    code[..bytes.min(code.len())].chars().count()
}

/// Completions from rust-analyzer, or none while a cell runs (never blocks the shell).
fn complete(shared: &Shared, code: &str, cursor: usize) -> Value {
    let empty = json!({
        "status": "ok", "matches": [], "cursor_start": cursor, "cursor_end": cursor, "metadata": {}
    });
    let Ok(mut guard) = shared.engine.try_lock() else {
        return empty;
    };
    let Some(engine) = guard.as_mut() else {
        return empty;
    };
    match engine.ctx.completions(code, byte_offset(code, cursor)) {
        Ok(c) => json!({
            "status": "ok",
            "matches": c.completions.iter().map(|c| c.code.clone()).collect::<Vec<_>>(),
            "cursor_start": char_offset(code, c.start_offset),
            "cursor_end": char_offset(code, c.end_offset),
            "metadata": {},
        }),
        Err(_) => empty,
    }
}

fn inspect(shared: &Shared, code: &str, cursor: usize) -> Value {
    let empty = json!({ "status": "ok", "found": false, "data": {}, "metadata": {} });
    let Ok(mut guard) = shared.engine.try_lock() else {
        return empty;
    };
    let Some(engine) = guard.as_mut() else {
        return empty;
    };
    match engine.ctx.hover_at(code, byte_offset(code, cursor)) {
        Ok((plain, html)) if !plain.trim().is_empty() => json!({
            "status": "ok", "found": true,
            "data": { "text/plain": plain, "text/html": html }, "metadata": {},
        }),
        _ => empty,
    }
}

fn history(shared: &Shared, req: &jupyter_protocol::HistoryRequest) -> Value {
    use jupyter_protocol::HistoryRequest as H;
    let all = shared.history.lock().unwrap().clone();
    let (entries, output): (Vec<(usize, String)>, bool) = match req {
        H::Tail { n, output, .. } => {
            let n = (*n).max(0) as usize;
            (all[all.len().saturating_sub(n)..].to_vec(), *output)
        }
        H::Range {
            start,
            stop,
            output,
            ..
        } => {
            let (start, stop) = (*start as usize, *stop as usize);
            (
                all.into_iter()
                    .filter(|(i, _)| *i >= start && (stop == 0 || *i < stop))
                    .collect(),
                *output,
            )
        }
        H::Search {
            pattern, n, output, ..
        } => {
            let needle = pattern.trim_matches('*');
            let hits: Vec<_> = all
                .into_iter()
                .filter(|(_, c)| c.contains(needle))
                .collect();
            let n = (*n).max(0) as usize;
            (hits[hits.len().saturating_sub(n)..].to_vec(), *output)
        }
    };
    let history: Vec<Value> = entries
        .into_iter()
        .map(|(i, code)| {
            if output {
                json!([0, i, [code, ""]])
            } else {
                json!([0, i, code])
            }
        })
        .collect();
    json!({ "status": "ok", "history": history })
}

#[cfg(test)]
mod tests {
    #[test]
    fn cursor_offsets_convert_between_chars_and_bytes() {
        let code = "let é = 1; é.";
        assert_eq!(super::byte_offset(code, 13), code.len());
        assert_eq!(super::char_offset(code, code.len()), 13);
    }
}
