//! The kernel side of the cooperative interrupt: a one-byte file the cell process reads
//! through `peft_prelude::notebook::interrupted()` (`0` normally, `1` once interrupted).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct InterruptFile {
    path: PathBuf,
    /// The count of interrupts (and shutdowns), for background runs that outlive their cell.
    count: Option<PathBuf>,
}

impl InterruptFile {
    pub fn new(path: &Path) -> Self {
        InterruptFile {
            path: path.to_path_buf(),
            count: None,
        }
    }

    /// Also counts every interrupt in `state_dir` (see `peft_protocol::interrupt_count_path`).
    pub fn counting_in(mut self, state_dir: &Path) -> Self {
        self.count = Some(peft_protocol::interrupt_count_path(state_dir));
        self
    }

    /// Before each cell: nothing is interrupted.
    pub fn reset(&self) {
        self.write(b"0");
    }

    /// On interrupt_request (and at shutdown).
    pub fn raise(&self) {
        self.write(b"1");
        if let Some(path) = &self.count {
            let n: u64 = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if let Err(e) = std::fs::write(path, (n + 1).to_string()) {
                eprintln!("peft-kernel: cannot write {}: {e}", path.display());
            }
        }
    }

    fn write(&self, byte: &[u8]) {
        if let Err(e) = std::fs::write(&self.path, byte) {
            eprintln!("peft-kernel: cannot write {}: {e}", self.path.display());
        }
    }
}
