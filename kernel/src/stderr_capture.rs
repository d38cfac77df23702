//! While the prelude compiles, evcxr copies cargo's "Compiling …" lines to the kernel's own
//! stderr (the Jupyter server's log). Redirecting fd 2 through a pipe lets the kernel show the
//! latest line in the notebook's "loading" display, while still passing everything to the log.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::FromRawFd;
use std::sync::{Arc, Mutex};

/// Starts capturing; the returned string holds the latest cargo progress line.
pub fn capture() -> Arc<Mutex<String>> {
    let latest = Arc::new(Mutex::new(String::new()));
    let mut fds = [0; 2];
    // SAFETY: plain POSIX calls on descriptors this function creates; on any failure stderr
    // is left as it was.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return latest;
        }
        let original = libc::dup(2);
        if original < 0 || libc::dup2(fds[1], 2) < 0 {
            return latest;
        }
        libc::close(fds[1]);
        let reader = BufReader::new(File::from_raw_fd(fds[0]));
        let mut log = File::from_raw_fd(original);
        let latest = Arc::clone(&latest);
        std::thread::Builder::new()
            .name("stderr".into())
            .spawn(move || {
                for line in reader.split(b'\n').map_while(Result::ok) {
                    let _ = log.write_all(&line);
                    let _ = log.write_all(b"\n");
                    let text = String::from_utf8_lossy(&line);
                    if text.trim_start().starts_with("Compiling ") {
                        *latest.lock().unwrap() = text.trim().to_string();
                    }
                }
            })
            .expect("spawning the stderr thread");
    }
    latest
}
