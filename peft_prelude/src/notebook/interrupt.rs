//! The cooperative interrupt check.
//!
//! The kernel writes `0` into a small file before each cell and `1` when the user interrupts;
//! the file's path reaches the cell process in [`ENV_INTERRUPT_FILE`]. A file (rather than a
//! static flag or a signal) works whatever evcxr's linking mode, and reading one byte costs
//! a few microseconds, cheap enough for once per generated token or training step.

use super::protocol::ENV_INTERRUPT_FILE;

/// `true` once the user has interrupted the running cell. Long loops (generation, training)
/// check it and return normally with what they have done, so every variable survives.
/// Always `false` outside the kernel.
pub fn interrupted() -> bool {
    let Some(path) = std::env::var_os(ENV_INTERRUPT_FILE) else {
        return false;
    };
    std::fs::read(path).is_ok_and(|bytes| peft_protocol::is_interrupted(&bytes))
}

/// How many times the kernel was interrupted (or asked to shut down) so far; never goes back.
/// A background run stops once it grows, whatever cell was running. 0 outside the kernel.
pub fn interrupt_count() -> u64 {
    let Some(dir) = std::env::var_os(peft_protocol::ENV_STATE_DIR) else {
        return 0;
    };
    std::fs::read_to_string(peft_protocol::interrupt_count_path(std::path::Path::new(
        &dir,
    )))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn not_interrupted_outside_the_kernel() {
        // The test process never has the variable set by the kernel.
        if std::env::var_os(super::ENV_INTERRUPT_FILE).is_none() {
            assert!(!super::interrupted());
        }
    }
}
