//! A cell that stops at `?` with an error: evcxr prints the error to stderr, then a marker
//! line on stdout that it consumes itself, and reports the cell as a success. So that Jupyter
//! sees an error (and `stop_on_error` holds the cells queued behind it), the cell process
//! copies its stdout through a pipe and, just before passing that marker on, writes
//! [`STDERR_MARKER`] to stderr, which the output forwarder turns into a failed cell.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;

/// What evcxr's generated code prints on stdout when a `?` returns early.
const EVCXR_MARKER: &[u8] = b"EVCXR_ERROR_OCCURRED";

/// The line the cell process writes to stderr at that moment (never shown).
pub const STDERR_MARKER: &str = "PEFT_KERNEL_CELL_RETURNED_AN_ERROR";

/// In the cell process, before evcxr's runtime loop: routes fd 1 through a copying thread.
/// On any failure stdout is left as it was (the cell still runs; only the status is lost).
pub fn watch_cell_stdout() {
    let mut fds = [0; 2];
    // SAFETY: plain POSIX calls on descriptors created here.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return;
        }
        let original = libc::dup(1);
        if original < 0 || libc::dup2(fds[1], 1) < 0 {
            return;
        }
        libc::close(fds[1]);
        let from = File::from_raw_fd(fds[0]);
        let to = File::from_raw_fd(original);
        let _ = std::thread::Builder::new()
            .name("stdout-copy".into())
            .spawn(move || copy(from, to, std::io::stderr()));
    }
}

/// Copies `from` to `to` as bytes arrive (partial lines too); when a whole line equals
/// evcxr's marker, writes [`STDERR_MARKER`] to `err` before passing the line on.
fn copy(mut from: impl Read, mut to: impl Write, mut err: impl Write) {
    let mut buf = [0u8; 8192];
    // The current line, as far as needed to recognise the marker.
    let mut line: Vec<u8> = Vec::with_capacity(EVCXR_MARKER.len() + 1);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut start = 0;
        for i in 0..n {
            if line.len() <= EVCXR_MARKER.len() {
                line.push(buf[i]);
            }
            if buf[i] == b'\n' {
                if line.strip_suffix(b"\n") == Some(EVCXR_MARKER) {
                    let _ = writeln!(err, "{STDERR_MARKER}");
                    let _ = err.flush();
                }
                line.clear();
                let _ = to.write_all(&buf[start..=i]);
                start = i + 1;
            }
        }
        let _ = to.write_all(&buf[start..n]);
        let _ = to.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_line_is_announced_on_stderr_first_and_everything_passes_through() {
        let input = b"hello\nEVCXR_ERROR_OCCURRED\npartial EVCXR_ERROR_OCCURRED\nEVCXR_ERROR_OCCURREDX\nend";
        let (mut out, mut err) = (Vec::new(), Vec::new());
        copy(&input[..], &mut out, &mut err);
        assert_eq!(out, input.to_vec());
        assert_eq!(
            String::from_utf8(err).unwrap(),
            format!("{STDERR_MARKER}\n")
        );
    }

    #[test]
    fn a_marker_split_across_reads_is_recognised() {
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(3).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let input = b"x\nEVCXR_ERROR_OCCURRED\n";
        let (mut out, mut err) = (Vec::new(), Vec::new());
        copy(Dribble(input), &mut out, &mut err);
        assert_eq!(out, input.to_vec());
        assert_eq!(
            String::from_utf8(err).unwrap(),
            format!("{STDERR_MARKER}\n")
        );
    }
}
