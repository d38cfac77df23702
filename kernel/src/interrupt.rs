//! The kernel side of the cooperative interrupt: a one-byte file the cell process reads
//! through `peft_prelude::notebook::interrupted()` (`0` normally, `1` once interrupted).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct InterruptFile {
    path: PathBuf,
}

impl InterruptFile {
    pub fn new(path: &Path) -> Self {
        InterruptFile {
            path: path.to_path_buf(),
        }
    }

    /// Before each cell: nothing is interrupted.
    pub fn reset(&self) {
        self.write(b"0");
    }

    /// On interrupt_request.
    pub fn raise(&self) {
        self.write(b"1");
    }

    fn write(&self, byte: &[u8]) {
        if let Err(e) = std::fs::write(&self.path, byte) {
            eprintln!("peft-kernel: cannot write {}: {e}", self.path.display());
        }
    }
}
