//! The prelude's side of the line protocol with the kernel (the format itself is the
//! `peft-protocol` crate, shared with the kernel): writing records, display ids.

use std::io::Write;

pub use peft_protocol::{Data, Record, ENV_INTERRUPT_FILE, ENV_KERNEL, MARKER};

/// Whether this process runs inside the `peft-kernel` Jupyter kernel.
pub fn in_kernel() -> bool {
    std::env::var_os(ENV_KERNEL).is_some_and(|v| v == "1")
}

thread_local! {
    /// Set on threads that outlive their cell (a background run, the widget watcher).
    static BACKGROUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one whose output may come while no cell runs: its records go
/// to stderr, which the kernel reads at all times (evcxr reads the cell process's stdout only
/// while a cell runs, so a background thread writing there would block once the pipe fills).
/// The prelude's own threads call this; call it first in a thread of your own that draws
/// widgets or displays after its cell has ended.
pub fn mark_background_thread() {
    BACKGROUND.with(|b| b.set(true));
}

/// Writes a record (only meaningful inside the kernel): to stdout, in order with the cell's
/// other output, or to stderr from a background thread.
pub(crate) fn emit(record: &Record) {
    let line = record.encode();
    if BACKGROUND.with(|b| b.get()) {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }
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
    fn display_ids_are_unique() {
        assert_ne!(new_display_id(), new_display_id());
    }
}
