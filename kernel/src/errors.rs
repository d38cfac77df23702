//! evcxr errors as Jupyter `error` content: the compiler's message pointing at the user's line.

use evcxr::Error;

/// `ename`, `evalue` and traceback lines of a failed cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellError {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

impl CellError {
    pub fn new(ename: &str, evalue: &str) -> Self {
        CellError {
            ename: ename.into(),
            evalue: evalue.into(),
            traceback: evalue.lines().map(str::to_string).collect(),
        }
    }
}

/// Describes an evcxr error for the notebook.
pub fn describe(error: &Error) -> CellError {
    match error {
        Error::CompilationErrors(errors) => {
            let mut traceback = vec![];
            for e in errors {
                let header = match e.code() {
                    Some(code) => format!("error[{code}]: {}", e.message()),
                    None => format!("error: {}", e.message()),
                };
                traceback.push(header);
                if e.is_from_user_code() {
                    for m in e.spanned_messages() {
                        let span = m
                            .span
                            .map(|s| (s.start_line, s.start_column, s.end_line, s.end_column));
                        traceback.extend(spanned_lines(span, &m.lines, &m.label));
                    }
                    traceback.extend(e.help().into_iter().map(|h| format!("help: {h}")));
                } else {
                    traceback.extend(e.rendered().lines().map(str::to_string));
                }
                traceback.push(String::new());
            }
            let evalue = errors
                .iter()
                .map(|e| e.message())
                .collect::<Vec<_>>()
                .join("\n");
            CellError {
                ename: "CompilationError".into(),
                evalue,
                traceback,
            }
        }
        Error::SubprocessTerminated(m) => CellError::new("ProcessTerminated", m),
        Error::TypeRedefinedVariablesLost(_) => CellError::new("VariablesLost", &error.to_string()),
        Error::Message(m) => CellError::new("Error", m),
    }
}

/// What a notebook user reads when the cell's process died: what happened, in words, and what
/// it cost. `status` is evcxr's message ("… Subprocess terminated with status: signal: 11
/// (SIGSEGV)"); `crash_note` the line the process wrote as it died, if any (Rust's allocation
/// failure and stack overflow reports, evcxr's crash handler's "Segmentation fault.").
pub fn termination(status: &str, crash_note: Option<&str>) -> String {
    let note = crash_note.unwrap_or("");
    let signal = |name: &str| status.contains(&format!("({name})"));
    let what = if note.contains("has overflowed its stack") {
        "The cell overflowed its stack (a recursion too deep, or a large array on the stack)"
            .to_string()
    } else if note.contains("memory allocation of") {
        format!("The cell ran out of memory ({note})")
    } else if note.contains("Segmentation fault.") || note.contains("Bus error.") {
        concat!(
            "The cell's process crashed with a segmentation fault ",
            "(an invalid memory access, in unsafe code or a native library)"
        )
        .to_string()
    } else if signal("SIGSEGV") {
        // evcxr's crash handler runs on the stack that faulted: when it cannot even print, the
        // stack itself was exhausted.
        concat!(
            "The cell overflowed its stack (a segmentation fault its crash handler could not ",
            "report: most often a recursion too deep)"
        )
        .to_string()
    } else if signal("SIGKILL") {
        "The cell's process was killed (SIGKILL: the system's out-of-memory killer, or kill -9)"
            .to_string()
    } else if signal("SIGABRT") {
        "The cell's process aborted (std::process::abort, or a failure Rust cannot unwind from)"
            .to_string()
    } else if status.contains("exit status") {
        "The cell's process exited (std::process::exit)".to_string()
    } else {
        "The cell's process ended".to_string()
    };
    let status = status
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    format!(
        "{what}.\nAll variables were lost. The kernel is still running and the prelude stays loaded: re-run the cells that define what you need.\n({status})"
    )
}

/// Source lines of a span with carets under it, as rustc prints them.
/// `span`: (start line, start column, end line, end column), 1-based, end column exclusive.
fn spanned_lines(
    span: Option<(usize, usize, usize, usize)>,
    lines: &[String],
    label: &str,
) -> Vec<String> {
    let Some((start_line, start_column, end_line, end_column)) = span else {
        return if label.is_empty() {
            vec![]
        } else {
            vec![format!("note: {label}")]
        };
    };
    let width = end_line.max(start_line).to_string().len();
    let mut out = vec![format!("{:width$} |", "")];
    for (i, line) in lines.iter().enumerate() {
        out.push(format!("{:width$} | {line}", start_line + i));
    }
    if start_line == end_line {
        let start = start_column.saturating_sub(1);
        let len = end_column.saturating_sub(start_column).max(1);
        out.push(format!(
            "{:width$} | {}{} {label}",
            "",
            " ".repeat(start),
            "^".repeat(len)
        ));
    } else if !label.is_empty() {
        out.push(format!("{:width$} = {label}", ""));
    }
    out
}

/// One plain-text block (for logs and `peft-kernel run`).
pub fn plain(error: &Error) -> String {
    describe(error).traceback.join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dying_process_is_named_by_what_killed_it() {
        use super::termination;
        let sig = |n: &str| format!("Subprocess terminated with status: signal: {n} (core dumped)");
        let stack = termination(
            &sig("6 (SIGABRT)"),
            Some("thread 'main' has overflowed its stack"),
        );
        assert!(
            stack.starts_with("The cell overflowed its stack"),
            "{stack}"
        );
        let oom = termination(
            &sig("6 (SIGABRT)"),
            Some("memory allocation of 70368744177664 bytes failed"),
        );
        assert!(
            oom.contains("ran out of memory (memory allocation of 70368744177664"),
            "{oom}"
        );
        let abort = termination(&sig("6 (SIGABRT)"), None);
        assert!(abort.contains("aborted"), "{abort}");
        let segv = termination(&sig("6 (SIGABRT)"), Some("Segmentation fault."));
        assert!(segv.contains("segmentation fault"), "{segv}");
        let silent = termination(&sig("11 (SIGSEGV)"), None);
        assert!(silent.contains("overflowed its stack"), "{silent}");
        let killed = termination(
            "Subprocess terminated with status: signal: 9 (SIGKILL)",
            None,
        );
        assert!(killed.contains("out-of-memory killer"), "{killed}");
        for m in [stack, oom, abort, segv, silent, killed] {
            assert!(m.contains("All variables were lost"), "{m}");
            assert!(m.contains("(Subprocess terminated with status"), "{m}");
        }
    }

    #[test]
    fn carets_sit_under_the_span() {
        let lines = vec!["let x = y + 1;".to_string()];
        let out = super::spanned_lines(Some((2, 9, 2, 10)), &lines, "not found in this scope");
        assert_eq!(
            out,
            vec![
                "  |",
                "2 | let x = y + 1;",
                "  |         ^ not found in this scope"
            ]
        );
    }
}
