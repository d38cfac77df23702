//! The line protocol between the prelude (inside the kernel's cell process) and the kernel.
//!
//! One record is one stdout line: [`MARKER`] followed by the record as JSON. The kernel reads
//! the cell process's stdout line by line, so a record must never contain a raw newline
//! (JSON escapes them) and is written with a single `write_all` under the stdout lock.

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

/// Starts every record line. The ASCII record separator makes a clash with user output unlikely.
pub const MARKER: &str = "\u{1e}peft-kernel ";
/// Set (to "1") by the kernel for the process that runs cells.
pub const ENV_KERNEL: &str = "PEFT_KERNEL";
/// Path of the file whose first byte is `1` while the running cell is interrupted.
pub const ENV_INTERRUPT_FILE: &str = "PEFT_KERNEL_INTERRUPT_FILE";

/// A mime bundle: mime type to content (binary content base64-encoded, as Jupyter wants it).
pub type Data = BTreeMap<String, String>;

/// One live-output record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// A new output, updatable later through its `id`.
    Display { id: String, data: Data },
    /// Replaces the content of every output shown with `id`.
    Update { id: String, data: Data },
    /// Text appended to a stream (`stdout` or `stderr`) without an added newline.
    Stream { name: String, text: String },
    /// Clears the cell's outputs (`wait`: when the next output arrives).
    Clear { wait: bool },
}

impl Record {
    /// The record as one protocol line, newline included.
    pub fn encode(&self) -> String {
        let json = serde_json::to_string(self).expect("a record always serializes");
        format!("{MARKER}{json}\n")
    }

    /// Parses a line read from the cell process (without its newline); `None` for plain output.
    pub fn decode(line: &str) -> Option<Record> {
        serde_json::from_str(line.strip_prefix(MARKER)?).ok()
    }
}

/// Whether this process runs inside the `peft-kernel` Jupyter kernel.
pub fn in_kernel() -> bool {
    std::env::var_os(ENV_KERNEL).is_some_and(|v| v == "1")
}

/// Writes a record to stdout (only meaningful inside the kernel).
pub(crate) fn emit(record: &Record) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(record.encode().as_bytes());
    let _ = out.flush();
}

/// A display id unique across cells and processes (statics are per cell under evcxr, so a
/// counter alone would repeat).
pub(crate) fn new_display_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("peft-{}-{nanos:x}-{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_on_one_line() {
        let mut data = Data::new();
        data.insert("text/plain".into(), "a\nb".into());
        data.insert("image/svg+xml".into(), "<svg>\n</svg>".into());
        for record in [
            Record::Display {
                id: "x".into(),
                data: data.clone(),
            },
            Record::Update {
                id: "x".into(),
                data,
            },
            Record::Stream {
                name: "stdout".into(),
                text: "tok\n".into(),
            },
            Record::Clear { wait: true },
        ] {
            let line = record.encode();
            assert!(line.starts_with(MARKER) && line.ends_with('\n'));
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            assert_eq!(Record::decode(line.trim_end_matches('\n')), Some(record));
        }
    }

    #[test]
    fn encoding_is_stable() {
        let record = Record::Stream {
            name: "stdout".into(),
            text: "hi".into(),
        };
        assert_eq!(
            record.encode(),
            "\u{1e}peft-kernel {\"op\":\"stream\",\"name\":\"stdout\",\"text\":\"hi\"}\n"
        );
    }

    #[test]
    fn plain_lines_are_not_records() {
        assert_eq!(Record::decode("hello"), None);
        assert_eq!(Record::decode("\u{1e}peft-kernel not json"), None);
    }

    #[test]
    fn display_ids_are_unique() {
        assert_ne!(new_display_id(), new_display_id());
    }
}
