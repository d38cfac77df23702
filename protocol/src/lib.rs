//! The wire format between the code a notebook cell runs (the prelude, inside the kernel's
//! cell process) and the `peft-kernel` Jupyter kernel. Both sides use this crate, so the format
//! is written once; it has no dependency beyond serde, so the kernel stays free of any ML code.
//!
//! * Live output: one record per stdout line, [`MARKER`] followed by the [`Record`] as JSON.
//!   The kernel reads the cell process's stdout line by line, so a record never contains a raw
//!   newline (JSON escapes them) and is written with a single `write` under the stdout lock.
//! * The cell process's environment: [`ENV_KERNEL`] marks it, [`ENV_INTERRUPT_FILE`] names
//!   the file whose first byte is `1` while the running cell is interrupted, [`ENV_STATE_DIR`]
//!   the folder through which the kernel hands the cell process what the page did to its
//!   widgets ([`CommState`], one file per comm) and learns which background runs are active.
//! * Widgets: the cell process opens comms and sends comm messages as records
//!   ([`Record::CommOpen`], [`Record::CommMsg`], [`Record::CommClose`]); the kernel sends them
//!   on as Jupyter messages, answers the page, and writes each comm's state for the cell to
//!   read, even while a cell runs (the same side channel as the interrupt flag: a file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Starts every record line. The ASCII record separator makes a clash with user output unlikely.
pub const MARKER: &str = "\u{1e}peft-kernel ";
/// Set (to "1") by the kernel for the process that runs cells.
pub const ENV_KERNEL: &str = "PEFT_KERNEL";
/// Path of the file whose first byte is `1` while the running cell is interrupted (the kernel
/// writes `0` before each cell).
pub const ENV_INTERRUPT_FILE: &str = "PEFT_KERNEL_INTERRUPT_FILE";

/// A folder for the kernel's side channel to the cell process (see [`CommState`] and
/// [`run_marker`]).
pub const ENV_STATE_DIR: &str = "PEFT_KERNEL_STATE_DIR";

/// What the page has done to one comm (a widget model), as the kernel last wrote it to
/// [`comm_state_path`]. Written whole and renamed into place, so a reader never sees half.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommState {
    /// Bumped by the kernel on every change, whichever side made it.
    pub version: u64,
    /// The model's state: what the cell opened it with, merged with every update since.
    pub state: serde_json::Map<String, Value>,
    /// Custom messages from the page (a button's `{"event": "click"}`) since the comm opened.
    pub custom_count: u64,
    /// The last [`KEPT_CUSTOM`] of them, oldest first.
    pub custom: Vec<Value>,
    /// The `seq` of the last [`Record::CommMsg`] from the cell merged into `state`: a value the
    /// cell set later than that is newer than the file's.
    pub cell_seq: u64,
}

/// How many custom messages a [`CommState`] keeps.
pub const KEPT_CUSTOM: usize = 64;

/// Where the state of comm `comm_id` lives in the state folder.
pub fn comm_state_path(dir: &Path, comm_id: &str) -> PathBuf {
    dir.join(format!("comm-{comm_id}.json"))
}

/// The file that exists while background run `id` of the cell process trains: the kernel
/// waits for these to go (the runs stop and checkpoint on the interrupt flag) before it ends
/// the cell process at shutdown.
pub fn run_marker(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("run-{id}.active"))
}

/// The file in the state folder that counts the interrupts (and shutdowns) of the kernel's
/// life, never reset: a background run, which outlives the cell that started it, stops when
/// the count grows (the per-cell interrupt flag is cleared before every cell).
pub fn interrupt_count_path(dir: &Path) -> PathBuf {
    dir.join("interrupts")
}

/// Whether a file in the state folder is a run marker.
pub fn is_run_marker(name: &str) -> bool {
    name.starts_with("run-") && name.ends_with(".active")
}

/// A mime bundle: mime type to content (binary content base64-encoded, as Jupyter wants it).
pub type Data = BTreeMap<String, String>;

/// One live-output record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// A new output, updatable later through its `id`.
    Display {
        id: String,
        data: Data,
    },
    /// Replaces the content of every output shown with `id`.
    Update {
        id: String,
        data: Data,
    },
    /// Text appended to a stream (`stdout` or `stderr`) without an added newline.
    Stream {
        name: String,
        text: String,
    },
    /// Clears the cell's outputs (`wait`: when the next output arrives).
    Clear {
        wait: bool,
    },
    /// Opens a comm (a widget model: `target_name` `jupyter.widget`, `data`
    /// `{"state": …, "buffer_paths": []}`, `metadata` `{"version": "2.1.0"}`).
    CommOpen {
        comm_id: String,
        target_name: String,
        data: Value,
        metadata: Value,
    },
    /// A message on an open comm (`{"method": "update", "state": …}` for a widget); `seq`
    /// numbers the cell's messages (see [`CommState::cell_seq`]).
    CommMsg {
        comm_id: String,
        data: Value,
        #[serde(default)]
        seq: u64,
    },
    CommClose {
        comm_id: String,
    },
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

/// A stdout line split into what it carries: text printed without a newline before a record
/// (`print!("label: ")` then streamed tokens) comes first.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Plain output (the line's text).
    Text(String),
    Record(Record),
}

/// Splits one line of the cell process's stdout (without its newline) into text and records.
/// A marker that does not start a valid record is plain text.
pub fn split_line(line: &str) -> Vec<Piece> {
    if let Some(at) = line.find(MARKER).filter(|&at| at > 0) {
        let (before, rest) = line.split_at(at);
        let mut pieces = vec![Piece::Text(before.to_string())];
        pieces.extend(split_line(rest));
        return pieces;
    }
    vec![match Record::decode(line) {
        Some(record) => Piece::Record(record),
        None => Piece::Text(line.to_string()),
    }]
}

/// Whether the interrupt file's content means "interrupted".
pub fn is_interrupted(flag_file_content: &[u8]) -> bool {
    flag_file_content.first() == Some(&b'1')
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
        assert_eq!(
            split_line("\u{1e}peft-kernel not json"),
            [Piece::Text("\u{1e}peft-kernel not json".into())]
        );
    }

    #[test]
    fn text_before_a_record_comes_first() {
        let record = Record::Clear { wait: false };
        let line = format!("label: {}", record.encode().trim_end());
        assert_eq!(
            split_line(&line),
            [Piece::Text("label: ".into()), Piece::Record(record)]
        );
    }
}
