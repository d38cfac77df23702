//! From the cell process's stdout/stderr lines to notebook outputs.
//!
//! Plain lines become stream output. Lines carrying the prelude's marker become displays,
//! display updates, raw stream text or clear_output (the `peft-protocol` crate, which the
//! prelude writes with). Output is coalesced so
//! that the Jupyter server's rate limits (1000 msgs/s, 1 MB/s) are never hit: stream text is
//! batched for 50 ms, and a display is updated at most four times a second (the latest
//! content wins, and the last one is always sent).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use peft_protocol::{split_line, Piece, Record};

/// Stream text waits at most this long to be merged with more.
const STREAM_BATCH: Duration = Duration::from_millis(50);
/// The shortest interval between two updates of one display.
const UPDATE_INTERVAL: Duration = Duration::from_millis(250);
/// The shortest interval between two state updates of one widget (later ones are merged).
const COMM_INTERVAL: Duration = Duration::from_millis(100);

pub type MimeData = peft_protocol::Data;

/// One notebook output.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Stream {
        name: String,
        text: String,
    },
    Display {
        id: Option<String>,
        data: MimeData,
    },
    Update {
        id: String,
        data: MimeData,
    },
    Clear {
        wait: bool,
    },
    /// A comm record of the cell's (widgets): opened, messaged or closed.
    Comm(Record),
}

/// Where outputs go: iopub messages, or the outputs of a notebook run headlessly.
pub trait Sink: Send + 'static {
    fn emit(&mut self, out: Out);
}

/// Turns one line of cell stdout into outputs. A record may follow text printed without a
/// newline (`print!("label: ")` then streamed tokens): that text comes first, as a stream.
pub fn parse_stdout_lines(line: &str) -> Vec<Out> {
    let pieces = split_line(line);
    let last = pieces.len().saturating_sub(1);
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| match piece {
            // Only the line's last piece ends where the line did.
            Piece::Text(text) if i == last => Out::Stream {
                name: "stdout".into(),
                text: format!("{text}\n"),
            },
            Piece::Text(text) => Out::Stream {
                name: "stdout".into(),
                text,
            },
            Piece::Record(Record::Display { id, data }) => Out::Display { id: Some(id), data },
            Piece::Record(Record::Update { id, data }) => Out::Update { id, data },
            Piece::Record(Record::Stream { name, text }) => Out::Stream { name, text },
            Piece::Record(Record::Clear { wait }) => Out::Clear { wait },
            Piece::Record(comm) => Out::Comm(comm),
        })
        .collect()
}

/// Per-id rate limiting: a value pushed sooner than `interval` after its id's last send is held
/// back, merged with later ones, and sent once due.
#[derive(Debug)]
struct Throttled<V> {
    interval: Duration,
    /// Held-back values, in the order their ids first came.
    pending: Vec<(String, V)>,
    last_sent: HashMap<String, Instant>,
}

impl<V> Throttled<V> {
    fn new(interval: Duration) -> Self {
        Throttled {
            interval,
            pending: vec![],
            last_sent: HashMap::new(),
        }
    }

    /// Takes `value` for `id`, merged into a held-back one by `merge`; returns what is due.
    fn push(
        &mut self,
        id: String,
        value: V,
        now: Instant,
        merge: impl FnOnce(&mut V, V),
    ) -> Option<(String, V)> {
        match self.pending.iter_mut().find(|(p, _)| *p == id) {
            Some((_, held)) => merge(held, value),
            None => self.pending.push((id.clone(), value)),
        }
        if self.is_due(&id, now) {
            self.take(&id, now)
        } else {
            None
        }
    }

    fn is_due(&self, id: &str, now: Instant) -> bool {
        self.last_sent
            .get(id)
            .is_none_or(|t| now >= *t + self.interval)
    }

    /// Records that `id` was sent at `now` by other means (a display's first showing).
    fn sent(&mut self, id: &str, now: Instant) {
        self.last_sent.insert(id.to_string(), now);
    }

    fn take(&mut self, id: &str, now: Instant) -> Option<(String, V)> {
        let i = self.pending.iter().position(|(p, _)| p == id)?;
        self.sent(id, now);
        Some(self.pending.remove(i))
    }

    /// The held-back values that are due by `now`.
    fn due(&mut self, now: Instant) -> Vec<(String, V)> {
        let ids: Vec<String> = self
            .pending
            .iter()
            .filter(|(id, _)| self.is_due(id, now))
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| self.take(id, now)).collect()
    }

    /// Every held-back value.
    fn drain(&mut self, now: Instant) -> Vec<(String, V)> {
        let ids: Vec<String> = self.pending.iter().map(|(id, _)| id.clone()).collect();
        ids.iter().filter_map(|id| self.take(id, now)).collect()
    }
}

/// A widget's state update: the fields (later ones merged in) and the latest sequence number.
type CommUpdate = (serde_json::Map<String, serde_json::Value>, u64);

fn comm_update((comm_id, (state, seq)): (String, CommUpdate)) -> Out {
    Out::Comm(Record::CommMsg {
        comm_id,
        data: serde_json::json!({ "method": "update", "state": state, "buffer_paths": [] }),
        seq,
    })
}

fn display_update((id, data): (String, MimeData)) -> Out {
    Out::Update { id, data }
}

/// Batches stream text and rate-limits display and widget updates; pure, so it is tested with
/// fake times.
#[derive(Debug)]
pub struct Coalescer {
    stream: Option<(String, String, Instant)>,
    /// Display updates: the latest content wins.
    updates: Throttled<MimeData>,
    /// Widget state updates: fields merged.
    comms: Throttled<CommUpdate>,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            stream: None,
            updates: Throttled::new(UPDATE_INTERVAL),
            comms: Throttled::new(COMM_INTERVAL),
        }
    }
}

impl Coalescer {
    /// Takes one output; returns what is due now, in order.
    pub fn push(&mut self, out: Out, now: Instant) -> Vec<Out> {
        let mut ready = vec![];
        match out {
            Out::Stream { name, text } => {
                match &mut self.stream {
                    Some((n, buf, _)) if *n == name => buf.push_str(&text),
                    _ => {
                        ready.extend(self.take_stream());
                        self.stream = Some((name, text, now));
                    }
                }
                ready.extend(self.tick(now));
            }
            Out::Update { id, data } => {
                ready.extend(self.take_stream());
                let due = self.updates.push(id, data, now, |held, new| *held = new);
                ready.extend(due.map(display_update));
            }
            Out::Comm(Record::CommMsg { comm_id, data, seq }) if data["method"] == "update" => {
                ready.extend(self.take_stream());
                let state = data["state"].as_object().cloned().unwrap_or_default();
                let due = self
                    .comms
                    .push(comm_id, (state, seq), now, |held, (state, seq)| {
                        held.0.extend(state);
                        held.1 = seq;
                    });
                ready.extend(due.map(comm_update));
            }
            other => {
                ready.extend(self.take_stream());
                if let Out::Comm(_) = &other {
                    // Opens, closes and custom messages keep their order with the updates.
                    ready.extend(self.comms.drain(now).into_iter().map(comm_update));
                }
                if let Out::Display { id: Some(id), .. } = &other {
                    self.updates.sent(id, now);
                }
                ready.push(other);
            }
        }
        ready
    }

    /// What has become due by `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        let mut ready = vec![];
        if self
            .stream
            .as_ref()
            .is_some_and(|(_, _, t)| now >= *t + STREAM_BATCH)
        {
            ready.extend(self.take_stream());
        }
        ready.extend(self.comms.due(now).into_iter().map(comm_update));
        ready.extend(self.updates.due(now).into_iter().map(display_update));
        ready
    }

    /// Everything held back (at the end of a cell).
    pub fn flush(&mut self, now: Instant) -> Vec<Out> {
        let mut ready: Vec<Out> = self.take_stream().into_iter().collect();
        ready.extend(self.comms.drain(now).into_iter().map(comm_update));
        ready.extend(self.updates.drain(now).into_iter().map(display_update));
        ready
    }

    fn take_stream(&mut self) -> Option<Out> {
        self.stream
            .take()
            .map(|(name, text, _)| Out::Stream { name, text })
    }
}

/// What the forwarder saw during one cell.
#[derive(Debug, Default)]
pub struct CellReport {
    /// The panic message, when the cell panicked (evcxr reports a caught panic as success).
    pub panic: Option<String>,
    /// When a `?` in the cell returned an error (evcxr reports that as success too): the
    /// last line the cell wrote to stderr before it, i.e. the end of the error's message.
    pub early_return: Option<String>,
    /// The first line the cell wrote to stderr that tells how a process dies ("memory
    /// allocation of … failed", evcxr's "Segmentation fault.", "… has overflowed its stack").
    pub crash_note: Option<String>,
}

/// The forwarder thread's handle.
#[derive(Clone)]
pub struct Forwarder {
    flush: Sender<Sender<CellReport>>,
}

impl Forwarder {
    /// Starts forwarding evcxr's output channels into `sink`.
    pub fn spawn(stdout: Receiver<String>, stderr: Receiver<String>, sink: impl Sink) -> Self {
        let (flush, flush_rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("output".into())
            .spawn(move || forward(stdout, stderr, flush_rx, sink))
            .expect("spawning the output thread");
        Forwarder { flush }
    }

    /// Waits until every line the cell wrote has been emitted; returns what the cell did.
    pub fn finish_cell(&self) -> CellReport {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.flush.send(tx).is_err() {
            return CellReport::default();
        }
        rx.recv().unwrap_or_default()
    }
}

/// Watches stderr for the default panic hook's report: "thread '…' panicked at FILE:" and then
/// the message lines, up to the "note:" line.
#[derive(Debug, Default)]
struct PanicWatch {
    message: Option<String>,
    collecting: bool,
}

impl PanicWatch {
    fn line(&mut self, line: &str) {
        // "thread 'main' panicked at src/lib.rs:1:1:" (newer toolchains add " (TID)").
        if line.starts_with("thread '") && line.contains(" panicked at ") {
            self.message = Some(String::new());
            self.collecting = true;
        } else if self.collecting {
            if line.starts_with("note: ") || line.starts_with("stack backtrace:") {
                self.collecting = false;
            } else if let Some(m) = &mut self.message {
                if !m.is_empty() {
                    m.push('\n');
                }
                m.push_str(line);
            }
        }
    }

    fn take(&mut self) -> Option<String> {
        self.collecting = false;
        self.message.take().map(|m| {
            if m.is_empty() {
                "panicked".to_string()
            } else {
                m
            }
        })
    }
}

/// The lines a dying cell process writes before it goes (Rust's allocation failure and stack
/// overflow reports, evcxr's crash handler).
const CRASH_MARKERS: [&str; 5] = [
    "memory allocation of ",
    "has overflowed its stack",
    "Segmentation fault.",
    "Bus error.",
    "Illegal instruction.",
];

/// Remembers the first crash marker line of a cell.
#[derive(Debug, Default)]
struct CrashWatch {
    note: Option<String>,
}

impl CrashWatch {
    fn line(&mut self, line: &str) {
        if self.note.is_none() && CRASH_MARKERS.iter().any(|m| line.contains(m)) {
            self.note = Some(line.trim().to_string());
        }
    }

    fn take(&mut self) -> Option<String> {
        self.note.take()
    }
}

/// Watches stderr for the cell process's note that a `?` returned an error
/// ([`crate::early_return::STDERR_MARKER`]); remembers the line before it as the message.
#[derive(Debug, Default)]
struct EarlyReturnWatch {
    last_line: String,
    message: Option<String>,
}

impl EarlyReturnWatch {
    /// Returns whether the line is to be shown (the marker is not).
    fn line(&mut self, line: &str) -> bool {
        if line == crate::early_return::STDERR_MARKER {
            self.message = Some(std::mem::take(&mut self.last_line));
            return false;
        }
        if !line.trim().is_empty() {
            self.last_line = line.to_string();
        }
        true
    }

    fn take(&mut self) -> Option<String> {
        self.last_line.clear();
        self.message.take()
    }
}

fn forward(
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    flush: Receiver<Sender<CellReport>>,
    mut sink: impl Sink,
) {
    let mut coalescer = Coalescer::default();
    let mut panic = PanicWatch::default();
    let mut early = EarlyReturnWatch::default();
    let mut crash = CrashWatch::default();
    let emit = |outs: Vec<Out>, sink: &mut dyn Sink| outs.into_iter().for_each(|o| sink.emit(o));
    // Background threads of the cell process write their records to stderr (read at all
    // times; stdout only while a cell runs).
    let on_stderr = |line: String,
                     panic: &mut PanicWatch,
                     early: &mut EarlyReturnWatch,
                     crash: &mut CrashWatch| {
        if line.contains(peft_protocol::MARKER) {
            return parse_stdout_lines(&line)
                .into_iter()
                .map(|out| match out {
                    Out::Stream { text, .. } => Out::Stream {
                        name: "stderr".into(),
                        text,
                    },
                    other => other,
                })
                .collect();
        }
        if !early.line(&line) {
            return vec![];
        }
        panic.line(&line);
        crash.line(&line);
        vec![Out::Stream {
            name: "stderr".into(),
            text: format!("{line}\n"),
        }]
    };
    loop {
        select! {
            recv(stdout) -> line => match line {
                Ok(line) => {
                    for out in parse_stdout_lines(&line) {
                        emit(coalescer.push(out, Instant::now()), &mut sink);
                    }
                }
                Err(_) => return,
            },
            recv(stderr) -> line => match line {
                Ok(line) => {
                    for out in on_stderr(line, &mut panic, &mut early, &mut crash) {
                        emit(coalescer.push(out, Instant::now()), &mut sink)
                    }
                }
                Err(_) => return,
            },
            recv(flush) -> reply => {
                let Ok(reply) = reply else { return };
                // stderr has its own reader thread in evcxr: give a panic report written just
                // before the cell ended a moment to arrive.
                std::thread::sleep(Duration::from_millis(20));
                while let Ok(line) = stdout.try_recv() {
                    for out in parse_stdout_lines(&line) {
                        emit(coalescer.push(out, Instant::now()), &mut sink);
                    }
                }
                while let Ok(line) = stderr.try_recv() {
                    for out in on_stderr(line, &mut panic, &mut early, &mut crash) {
                        emit(coalescer.push(out, Instant::now()), &mut sink);
                    }
                }
                emit(coalescer.flush(Instant::now()), &mut sink);
                let _ = reply.send(CellReport {
                    panic: panic.take(),
                    early_return: early.take(),
                    crash_note: crash.take(),
                });
            },
            default(Duration::from_millis(20)) => emit(coalescer.tick(Instant::now()), &mut sink),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The single output a line makes.
    fn one_output(line: &str) -> Out {
        let mut outs = parse_stdout_lines(line);
        assert_eq!(outs.len(), 1, "{outs:?}");
        outs.remove(0)
    }

    fn data(s: &str) -> MimeData {
        MimeData::from([("text/plain".to_string(), s.to_string())])
    }

    #[test]
    fn a_record_after_unterminated_text_is_still_a_record() {
        let line =
            "label -> \u{1e}peft-kernel {\"op\":\"stream\",\"name\":\"stdout\",\"text\":\"gl\"}";
        assert_eq!(
            parse_stdout_lines(line),
            vec![
                Out::Stream {
                    name: "stdout".into(),
                    text: "label -> ".into()
                },
                Out::Stream {
                    name: "stdout".into(),
                    text: "gl".into()
                },
            ]
        );
    }

    #[test]
    fn parses_the_preludes_records() {
        // The exact line peft_prelude's protocol test pins down.
        let line = "\u{1e}peft-kernel {\"op\":\"stream\",\"name\":\"stdout\",\"text\":\"hi\"}";
        assert_eq!(
            one_output(line),
            Out::Stream {
                name: "stdout".into(),
                text: "hi".into()
            }
        );
        let line =
            "\u{1e}peft-kernel {\"op\":\"update\",\"id\":\"d\",\"data\":{\"text/plain\":\"x\"}}";
        assert_eq!(
            one_output(line),
            Out::Update {
                id: "d".into(),
                data: data("x")
            }
        );
        let line = "\u{1e}peft-kernel {\"op\":\"clear\",\"wait\":true}";
        assert_eq!(one_output(line), Out::Clear { wait: true });
        assert_eq!(
            one_output("plain"),
            Out::Stream {
                name: "stdout".into(),
                text: "plain\n".into()
            }
        );
    }

    #[test]
    fn widget_updates_are_merged_and_rate_limited() {
        let mut c = Coalescer::default();
        let t0 = Instant::now();
        let update = |v: i32, seq: u64| {
            Out::Comm(Record::CommMsg {
                comm_id: "w".into(),
                data: serde_json::json!({"method": "update", "state": {"value": v, format!("k{v}"): v}}),
                seq,
            })
        };
        assert_eq!(c.push(update(1, 1), t0).len(), 1, "the first goes at once");
        assert!(c
            .push(update(2, 2), t0 + Duration::from_millis(10))
            .is_empty());
        assert!(c
            .push(update(3, 3), t0 + Duration::from_millis(20))
            .is_empty());
        let out = c.tick(t0 + Duration::from_millis(120));
        match out.as_slice() {
            [Out::Comm(Record::CommMsg { data, seq, .. })] => {
                assert_eq!(data["state"]["value"], 3, "the latest value");
                assert_eq!(
                    (data["state"]["k2"].clone(), *seq),
                    (serde_json::json!(2), 3)
                );
            }
            other => panic!("{other:?}"),
        }
        // A close waits for nothing: pending updates of any comm go first.
        c.push(update(4, 4), t0 + Duration::from_millis(130));
        let out = c.push(
            Out::Comm(Record::CommClose {
                comm_id: "w".into(),
            }),
            t0 + Duration::from_millis(140),
        );
        assert!(
            matches!(
                out.as_slice(),
                [
                    Out::Comm(Record::CommMsg { .. }),
                    Out::Comm(Record::CommClose { .. })
                ]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn stream_text_is_batched() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        let s = |t: &str| Out::Stream {
            name: "stdout".into(),
            text: t.into(),
        };
        assert!(c.push(s("a"), t0).is_empty());
        assert!(c.push(s("b"), t0 + Duration::from_millis(10)).is_empty());
        assert_eq!(c.tick(t0 + Duration::from_millis(60)), vec![s("ab")]);
        assert!(c.push(s("c"), t0 + Duration::from_millis(70)).is_empty());
        let err = Out::Stream {
            name: "stderr".into(),
            text: "e".into(),
        };
        assert_eq!(
            c.push(err.clone(), t0 + Duration::from_millis(71)),
            vec![s("c")]
        );
        assert_eq!(c.flush(t0 + Duration::from_millis(72)), vec![err]);
    }

    #[test]
    fn updates_are_rate_limited_and_the_last_one_wins() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        let ms = |n| t0 + Duration::from_millis(n);
        let shown = Out::Display {
            id: Some("d".into()),
            data: data("0"),
        };
        assert_eq!(c.push(shown.clone(), ms(0)), vec![shown]);
        for i in 1..=100 {
            let out = c.push(
                Out::Update {
                    id: "d".into(),
                    data: data(&i.to_string()),
                },
                ms(i),
            );
            assert!(out.is_empty(), "update {i} sent too early");
        }
        assert!(c.tick(ms(200)).is_empty());
        assert_eq!(
            c.tick(ms(250)),
            vec![Out::Update {
                id: "d".into(),
                data: data("100")
            }]
        );
        let u = Out::Update {
            id: "d".into(),
            data: data("101"),
        };
        assert!(c.push(u.clone(), ms(300)).is_empty());
        assert_eq!(c.flush(ms(301)), vec![u]);
        assert!(c.flush(ms(302)).is_empty());
    }

    #[test]
    fn a_panic_report_is_recognised() {
        let mut w = PanicWatch::default();
        w.line("thread '<unnamed>' (31482) panicked at src/lib.rs:3:5:");
        w.line("boom");
        w.line("note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace");
        w.line("later output");
        assert_eq!(w.take().as_deref(), Some("boom"));
        assert_eq!(w.take(), None);
    }
}
