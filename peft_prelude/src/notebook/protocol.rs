//! The prelude's side of the line protocol with the kernel (the format itself is the
//! `peft-protocol` crate, shared with the kernel): writing records, display ids.

use std::io::Write;

pub use peft_protocol::{Data, Record, ENV_INTERRUPT_FILE, ENV_KERNEL, MARKER};

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
    fn display_ids_are_unique() {
        assert_ne!(new_display_id(), new_display_id());
    }
}
