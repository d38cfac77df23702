//! Text that appears as it is produced: raw stream output without a forced newline, and a
//! token streamer for generation.

use std::io::Write;
use std::time::{Duration, Instant};

use super::protocol::{emit, in_kernel, Record};
use crate::generate::Streamer;

/// Appends `text` to the cell's stdout as is (no newline added). Inside the kernel this is a
/// stream record, so text without a newline shows at once; elsewhere it is `print!` + flush.
pub fn print_stream(text: &str) {
    if text.is_empty() {
        return;
    }
    if in_kernel() {
        emit(&Record::Stream {
            name: "stdout".into(),
            text: text.into(),
        });
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// Clears the cell's output (`wait`: only when the next output arrives, which avoids flicker).
pub fn clear_output(wait: bool) {
    if in_kernel() {
        emit(&Record::Clear { wait });
    }
}

/// Streams generated tokens into the cell output, batching them into a few records per second
/// (the kernel coalesces further). Keeps the whole text too.
#[derive(Debug)]
pub struct TokenStreamer {
    pending: String,
    text: String,
    last_emit: Option<Instant>,
    interval: Duration,
}

impl Default for TokenStreamer {
    fn default() -> Self {
        TokenStreamer::new()
    }
}

impl TokenStreamer {
    pub fn new() -> Self {
        TokenStreamer {
            pending: String::new(),
            text: String::new(),
            last_emit: None,
            interval: Duration::from_millis(50),
        }
    }

    /// Everything streamed so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn flush(&mut self) {
        print_stream(&self.pending);
        self.pending.clear();
        self.last_emit = Some(Instant::now());
    }
}

impl Streamer for TokenStreamer {
    fn put(&mut self, text: &str) {
        self.text.push_str(text);
        self.pending.push_str(text);
        if self.last_emit.is_none_or(|t| t.elapsed() >= self.interval) {
            self.flush();
        }
    }

    fn end(&mut self) {
        self.pending.push('\n');
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_streamer_keeps_the_text() {
        let mut s = TokenStreamer::new();
        for piece in ["1", ", ", "2"] {
            s.put(piece);
        }
        s.end();
        assert_eq!(s.text(), "1, 2");
        assert!(s.pending.is_empty());
    }
}
