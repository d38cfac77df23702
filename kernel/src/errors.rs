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
