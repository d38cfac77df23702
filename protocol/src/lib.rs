//! The wire format between the code a notebook cell runs (the prelude, inside the kernel's
//! cell process) and the `peft-kernel` Jupyter kernel. Both sides use this crate, so the format
//! is written once; it has no dependency beyond serde, so the kernel stays free of any ML code.
//!
//! * Live output: one record per stdout line, [`MARKER`] followed by the [`Record`] as JSON.
//!   The kernel reads the cell process's stdout line by line, so a record never contains a raw
//!   newline (JSON escapes them) and is written with a single `write` under the stdout lock.
//! * The cell process's environment: [`ENV_KERNEL`] marks it, [`ENV_INTERRUPT_FILE`] names
//!   the file whose first byte is `1` while the running cell is interrupted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Starts every record line. The ASCII record separator makes a clash with user output unlikely.
pub const MARKER: &str = "\u{1e}peft-kernel ";
/// Set (to "1") by the kernel for the process that runs cells.
pub const ENV_KERNEL: &str = "PEFT_KERNEL";
/// Path of the file whose first byte is `1` while the running cell is interrupted (the kernel
/// writes `0` before each cell).
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
