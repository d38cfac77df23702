//! The executor thread: loads the prelude in the background, then runs queued cells one at a
//! time, with busy/idle, execute_input, outputs, execute_result / error and the reply in the
//! order Jupyter expects.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use jupyter_protocol::{JupyterMessage, JupyterMessageContent};
use serde_json::{json, Value};

use crate::engine::{prelude_path, Engine};
use crate::errors::{describe, CellError};
use crate::messages::{child, comm_message, mime_json, output_content, status};
use crate::output::{Forwarder, MimeData, Out, Sink};
use crate::server::Shared;
use crate::slot::Slot;

pub struct Request {
    pub seq: u64,
    pub msg: JupyterMessage,
}

/// Sends outputs to iopub as children of the cell that is running.
struct IopubSink {
    shared: Arc<Shared>,
    parent: Arc<Mutex<Option<JupyterMessage>>>,
}

impl Sink for IopubSink {
    /// Between cells (a background run, a widget callback) outputs go out as children of the
    /// last cell: widgets' comm messages reach the page whatever their parent.
    fn emit(&mut self, out: Out) {
        let Some(parent) = self.parent.lock().unwrap().clone() else {
            return;
        };
        let msg = match &out {
            Out::Comm(record) => match self.shared.comms.relay_cell_record(record) {
                Some(reply) => comm_message(&parent, reply),
                None => return,
            },
            _ => {
                let (t, content) = output_content(&out);
                child(&parent, t, content)
            }
        };
        let _ = self.shared.iopub.send(msg);
    }
}

/// Starts loading the prelude and the executor; returns the queue of execute requests.
pub fn spawn(shared: Arc<Shared>, slot: Slot) -> Sender<Request> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let parent = Arc::new(Mutex::new(None));
    let (init_tx, init_rx) = crossbeam_channel::bounded(1);
    {
        let shared = Arc::clone(&shared);
        let parent = Arc::clone(&parent);
        std::thread::Builder::new()
            .name("prelude".into())
            .spawn(move || {
                let mut forwarder = None;
                let result = Engine::start(&slot, &prelude_path(), |outputs| {
                    let sink = IopubSink {
                        shared: Arc::clone(&shared),
                        parent,
                    };
                    forwarder = Some(Forwarder::spawn(outputs.stdout, outputs.stderr, sink));
                });
                let result = result.map(|engine| {
                    *shared.process.lock().unwrap() = Some(Arc::clone(&engine.process));
                    *shared.engine.lock().unwrap() = Some(engine);
                });
                let _ = init_tx.send((result.map_err(|e| format!("{e:#}")), forwarder));
                // The slot's lock must outlive the kernel.
                std::mem::forget(slot);
            })
            .expect("spawning the prelude thread");
    }
    std::thread::Builder::new()
        .name("executor".into())
        .spawn(move || {
            Executor {
                shared,
                parent,
                count: 0,
                init: Init::Pending(init_rx),
                analyzer_warm: false,
            }
            .run(rx)
        })
        .expect("spawning the executor thread");
    tx
}

type InitResult = (Result<(), String>, Option<Forwarder>);

enum Init {
    Pending(Receiver<InitResult>),
    Ready(Forwarder),
    Failed(String),
}

impl From<InitResult> for Init {
    fn from(result: InitResult) -> Init {
        match result {
            (Ok(()), Some(f)) => Init::Ready(f),
            (Err(e), _) => Init::Failed(e),
            (Ok(()), None) => Init::Failed("evcxr produced no output channels".into()),
        }
    }
}

struct Executor {
    shared: Arc<Shared>,
    parent: Arc<Mutex<Option<JupyterMessage>>>,
    count: usize,
    init: Init,
    /// Whether rust-analyzer has read the crates yet (see [`Engine::warm_analyzer`]).
    analyzer_warm: bool,
}

/// How long the kernel must have been idle, the prelude loaded, before it warms rust-analyzer.
/// "Restart and run all" sends its first cell at once, which then runs without waiting.
const WARM_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

enum Outcome {
    Ok,
    Error(CellError),
}

impl Executor {
    fn run(mut self, requests: Receiver<Request>) {
        while let Some(req) = self.next_request(&requests) {
            let JupyterMessageContent::ExecuteRequest(exec) = &req.msg.content else {
                continue;
            };
            let exec = exec.clone();
            let msg = &req.msg;
            self.iopub(status(msg, "busy"));
            if req.seq < self.shared.abort_below.load(Ordering::SeqCst) {
                self.reply(
                    msg,
                    json!({ "status": "aborted", "execution_count": self.count }),
                );
                self.iopub(status(msg, "idle"));
                continue;
            }
            if !exec.silent && exec.store_history {
                self.count += 1;
                self.shared
                    .history
                    .lock()
                    .unwrap()
                    .push((self.count, exec.code.clone()));
            }
            let count = self.count;
            self.iopub(child(
                msg,
                "execute_input",
                json!({ "code": exec.code, "execution_count": count }),
            ));
            self.shared.interrupt.reset();
            self.shared.interrupted.store(false, Ordering::SeqCst);
            self.shared.killed.store(false, Ordering::SeqCst);
            self.shared.running.store(req.seq, Ordering::SeqCst);
            *self.parent.lock().unwrap() = Some(msg.clone());

            let outcome = self.execute(msg, &exec.code, count, exec.silent);

            self.shared.running.store(0, Ordering::SeqCst);
            let interrupted = self.shared.interrupted.load(Ordering::SeqCst);
            let content = match &outcome {
                Outcome::Ok => json!({
                    "status": "ok", "execution_count": count, "payload": [], "user_expressions": {}
                }),
                Outcome::Error(e) => {
                    self.iopub(child(
                        msg,
                        "error",
                        json!({ "ename": e.ename, "evalue": e.evalue, "traceback": e.traceback }),
                    ));
                    json!({
                        "status": "error", "execution_count": count,
                        "ename": e.ename, "evalue": e.evalue, "traceback": e.traceback,
                    })
                }
            };
            // Jupyter's stop_on_error (and an interrupt) drop the cells queued behind this one.
            if (matches!(outcome, Outcome::Error(_)) && exec.stop_on_error) || interrupted {
                let last = self.shared.last_seq.load(Ordering::SeqCst);
                self.shared
                    .abort_below
                    .fetch_max(last + 1, Ordering::SeqCst);
            }
            self.reply(msg, content);
            self.iopub(status(msg, "idle"));
        }
    }

    /// The next execute request; while there is none, and once the prelude has loaded, warms
    /// rust-analyzer (once) so that the first cell defining a variable answers at once.
    fn next_request(&mut self, requests: &Receiver<Request>) -> Option<Request> {
        loop {
            if self.analyzer_warm {
                return requests.recv().ok();
            }
            match requests.recv_timeout(WARM_WHEN_IDLE_FOR) {
                Ok(req) => return Some(req),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => self.warm_when_loaded(),
            }
        }
    }

    fn warm_when_loaded(&mut self) {
        if let Init::Pending(rx) = &self.init {
            match rx.try_recv() {
                Ok(result) => self.init = Init::from(result),
                Err(crossbeam_channel::TryRecvError::Empty) => return,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.init = Init::Failed("the prelude thread died".into())
                }
            }
        }
        if !matches!(self.init, Init::Ready(_)) {
            self.analyzer_warm = true; // nothing to warm
            return;
        }
        let started = Instant::now();
        if let Some(engine) = self.shared.engine.lock().unwrap().as_mut() {
            engine.warm_analyzer();
        }
        self.analyzer_warm = true;
        eprintln!(
            "peft-kernel: rust-analyzer warmed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    fn execute(&mut self, msg: &JupyterMessage, code: &str, count: usize, silent: bool) -> Outcome {
        let forwarder = match self.wait_for_prelude(msg) {
            Ok(f) => f,
            Err(e) => return Outcome::Error(CellError::new("PreludeError", &e)),
        };
        let mut guard = self.shared.engine.lock().unwrap();
        let engine = guard.as_mut().expect("the prelude is loaded");
        let input = |_| String::new();
        let mut callbacks = evcxr::EvalCallbacks {
            input_reader: &input,
        };
        let result = engine.ctx.execute_with_callbacks(code, &mut callbacks);
        drop(guard);
        let report = forwarder.finish_cell();
        if self.shared.killed.load(Ordering::SeqCst) {
            return Outcome::Error(CellError::new(
                "KernelInterrupted",
                "The cell did not stop after the interrupt, so its process was killed: \
                 all variables are lost (definitions and the prelude remain).",
            ));
        }
        match result {
            Ok(outputs) => {
                if let Some(message) = report.panic {
                    return Outcome::Error(CellError::new("panic", &message));
                }
                if let Some(message) = report.early_return {
                    let message = if message.is_empty() {
                        "a `?` returned an error".to_string()
                    } else {
                        message
                    };
                    return Outcome::Error(CellError::new("Error", &message));
                }
                if !outputs.is_empty() && !silent {
                    let data: MimeData = outputs.content_by_mime_type.into_iter().collect();
                    let content = json!({ "execution_count": count, "data": mime_json(&data), "metadata": {} });
                    self.iopub(child(msg, "execute_result", content));
                }
                Outcome::Ok
            }
            Err(evcxr::Error::SubprocessTerminated(status)) => Outcome::Error(CellError::new(
                "ProcessTerminated",
                &crate::errors::termination(&status, report.crash_note.as_deref()),
            )),
            Err(e) => Outcome::Error(describe(&e)),
        }
    }

    /// Returns once the prelude is loaded; meanwhile shows what cargo is doing in a display.
    fn wait_for_prelude(&mut self, msg: &JupyterMessage) -> Result<Forwarder, String> {
        let rx = match &self.init {
            Init::Ready(f) => return Ok(f.clone()),
            Init::Failed(e) => return Err(e.clone()),
            Init::Pending(rx) => rx.clone(),
        };
        let start = Instant::now();
        let id = format!("peft-kernel-loading-{}", msg.header.msg_id);
        let loading = |text: String| MimeData::from([("text/plain".to_string(), text)]);
        let mut shown = false;
        let mut last_text = String::new();
        let result = loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(r) => break r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let cargo = self.shared.cargo_status.lock().unwrap().clone();
                    let text = format!(
                        "Loading peft_prelude… {:.0} s{}",
                        start.elapsed().as_secs_f64(),
                        if cargo.is_empty() {
                            String::new()
                        } else {
                            format!("\n{}", cargo.trim())
                        }
                    );
                    if text != last_text {
                        let out = if shown {
                            Out::Update {
                                id: id.clone(),
                                data: loading(text.clone()),
                            }
                        } else {
                            Out::Display {
                                id: Some(id.clone()),
                                data: loading(text.clone()),
                            }
                        };
                        let (t, c) = output_content(&out);
                        self.iopub(child(msg, t, c));
                        shown = true;
                        last_text = text;
                    }
                }
                Err(_) => break (Err("the prelude thread died".into()), None),
            }
        };
        if shown {
            let text = format!(
                "peft_prelude loaded in {:.1} s",
                start.elapsed().as_secs_f64()
            );
            let (t, c) = output_content(&Out::Update {
                id,
                data: loading(text),
            });
            self.iopub(child(msg, t, c));
        }
        self.init = Init::from(result);
        match &self.init {
            Init::Ready(f) => Ok(f.clone()),
            Init::Failed(e) => Err(e.clone()),
            Init::Pending(_) => unreachable!(),
        }
    }

    fn iopub(&self, msg: JupyterMessage) {
        let _ = self.shared.iopub.send(msg);
    }

    fn reply(&self, msg: &JupyterMessage, content: Value) {
        let _ = self
            .shared
            .shell_out
            .send(child(msg, "execute_reply", content));
    }
}
