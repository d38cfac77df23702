//! Rich outputs and display handles: `show(x)` shows anything with a mime bundle and returns a
//! handle whose `update` replaces that output in place.

use std::fmt::Write as _;

use super::protocol::{emit, in_kernel, new_display_id, Data, Record};

/// Mime type to content; binary formats (PNG) base64-encoded.
pub type MimeBundle = Data;

/// Anything that can be shown in a notebook. `text/plain` should always be present: it is what
/// a script or a plain REPL prints.
pub trait Rich {
    fn mime_bundle(&self) -> MimeBundle;
}

impl Rich for str {
    fn mime_bundle(&self) -> MimeBundle {
        plain(self)
    }
}

impl Rich for String {
    fn mime_bundle(&self) -> MimeBundle {
        plain(self)
    }
}

impl<T: Rich + ?Sized> Rich for &T {
    fn mime_bundle(&self) -> MimeBundle {
        (**self).mime_bundle()
    }
}

impl Rich for MimeBundle {
    fn mime_bundle(&self) -> MimeBundle {
        self.clone()
    }
}

fn plain(text: &str) -> MimeBundle {
    MimeBundle::from([("text/plain".to_string(), text.to_string())])
}

/// Shows `x` as a new output and returns its handle.
pub fn show(x: &(impl Rich + ?Sized)) -> Display {
    let display = Display {
        id: new_display_id(),
    };
    let data = x.mime_bundle();
    if in_kernel() {
        emit(&Record::Display {
            id: display.id.clone(),
            data,
        });
    } else {
        print_plain(&data);
    }
    display
}

/// Shows plain text as a new, updatable output.
pub fn show_text(text: &str) -> Display {
    show(text)
}

/// A handle on one output; `update` replaces it in place (every copy of it, in every cell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Display {
    id: String,
}

impl Display {
    /// Replaces the output's content.
    pub fn update(&self, x: &(impl Rich + ?Sized)) {
        let data = x.mime_bundle();
        if in_kernel() {
            emit(&Record::Update {
                id: self.id.clone(),
                data,
            });
        } else {
            print_plain(&data);
        }
    }

    /// The Jupyter display id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// What a script sees: the text/plain part, or a note of what could not be printed.
fn print_plain(data: &MimeBundle) {
    match data.get("text/plain") {
        Some(text) => println!("{text}"),
        None => {
            let kinds: Vec<&str> = data.keys().map(String::as_str).collect();
            println!("[{}]", kinds.join(", "));
        }
    }
}

/// Prints a bundle as evcxr's final-expression display does, so these types show richly when
/// they are the last expression of a cell.
pub(crate) fn evcxr_print(data: &MimeBundle) {
    let mut out = String::new();
    for (mime, content) in data {
        let _ = write!(
            out,
            "EVCXR_BEGIN_CONTENT {mime}\n{content}\nEVCXR_END_CONTENT\n"
        );
    }
    print!("{out}");
}

/// Shows any `Debug` value that is the last expression of a cell, as evcxr would, in one build.
///
/// evcxr first compiles `(value).evcxr_display()` and, when the type has no such method,
/// compiles the cell a second time with `{:?}`: a whole extra cargo and rustc round trip
/// (about 0.2 s) for every `1 + 1`. With this trait in scope every `Debug` type has the method,
/// so the first build succeeds. Inherent `evcxr_display` methods (our rich types, a user's own)
/// win over a trait's, so they still show richly. Brought in unnamed by the prelude.
pub trait DebugDisplay {
    fn evcxr_display(&self);
}

impl<T: std::fmt::Debug + ?Sized> DebugDisplay for T {
    fn evcxr_display(&self) {
        evcxr_print(&plain(&format!("{self:?}")));
    }
}

macro_rules! evcxr_display {
    ($($t:ty),*) => {$(
        impl $t {
            /// Called by evcxr when this is the last expression of a cell.
            pub fn evcxr_display(&self) {
                evcxr_print(&self.mime_bundle());
            }
        }
    )*};
}
evcxr_display!(Html, Svg, Png, Table);

/// HTML content (with a plain-text alternative).
#[derive(Debug, Clone, PartialEq)]
pub struct Html {
    pub html: String,
    pub text: String,
}

impl Html {
    pub fn new(html: impl Into<String>) -> Self {
        Html {
            html: html.into(),
            text: "[HTML]".into(),
        }
    }
}

impl Rich for Html {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::from([
            ("text/html".to_string(), self.html.clone()),
            ("text/plain".to_string(), self.text.clone()),
        ])
    }
}

/// An SVG image.
#[derive(Debug, Clone, PartialEq)]
pub struct Svg(pub String);

impl Rich for Svg {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::from([
            ("image/svg+xml".to_string(), self.0.clone()),
            (
                "text/plain".to_string(),
                format!("[SVG image, {} bytes]", self.0.len()),
            ),
        ])
    }
}

/// A PNG image (the encoded file's bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Png(pub Vec<u8>);

impl Rich for Png {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::from([
            ("image/png".to_string(), base64(&self.0)),
            (
                "text/plain".to_string(),
                format!("[PNG image, {} bytes]", self.0.len()),
            ),
        ])
    }
}

/// A table of strings: HTML in a notebook, aligned columns as text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: ToString>(header: impl IntoIterator<Item = S>) -> Self {
        Table {
            header: header.into_iter().map(|s| s.to_string()).collect(),
            rows: vec![],
        }
    }

    pub fn row<S: ToString>(mut self, cells: impl IntoIterator<Item = S>) -> Self {
        self.rows
            .push(cells.into_iter().map(|s| s.to_string()).collect());
        self
    }

    /// A two-column (field, value) table of anything serializable to a JSON object, such as a
    /// model configuration. Nested values are shown as JSON.
    /// The files of a directory with their sizes (what a save wrote), sorted by name.
    pub fn of_files(dir: impl AsRef<std::path::Path>) -> crate::Result<Self> {
        Self::of_files_in(dir.as_ref())
    }

    fn of_files_in(dir: &std::path::Path) -> crate::Result<Self> {
        let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
            .map_err(|e| crate::Error::io(dir, e))?
            .flatten()
            .filter_map(|e| {
                let size = e.metadata().ok().filter(|m| m.is_file())?.len();
                Some((e.file_name().to_string_lossy().into_owned(), size))
            })
            .collect();
        files.sort();
        Ok(files
            .into_iter()
            .fold(Table::new(["file", "bytes"]), |t, (name, size)| {
                t.row([name, size.to_string()])
            }))
    }

    pub fn from_serialize(value: &impl serde::Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or_default();
        let mut table = Table::new(["field", "value"]);
        if let serde_json::Value::Object(map) = value {
            for (key, v) in map {
                let shown = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                table = table.row([key, shown]);
            }
        }
        table
    }

    fn text(&self) -> String {
        let columns = self
            .rows
            .iter()
            .chain([&self.header])
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let width = |c: usize| {
            self.rows
                .iter()
                .chain([&self.header])
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(c, w)| format!("{:w$}", cells.get(c).map(String::as_str).unwrap_or("")))
                .collect();
            padded.join("  ").trim_end().to_string()
        };
        let mut out = vec![line(&self.header)];
        out.push(
            widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  "),
        );
        out.extend(self.rows.iter().map(|r| line(r)));
        out.join("\n")
    }

    fn html(&self) -> String {
        let mut html = String::from("<table>\n<thead><tr>");
        for h in &self.header {
            let _ = write!(
                html,
                "<th style=\"text-align:left\">{}</th>",
                escape_html(h)
            );
        }
        html.push_str("</tr></thead>\n<tbody>\n");
        for row in &self.rows {
            html.push_str("<tr>");
            for cell in row {
                let _ = write!(
                    html,
                    "<td style=\"text-align:left\">{}</td>",
                    escape_html(cell)
                );
            }
            html.push_str("</tr>\n");
        }
        html.push_str("</tbody>\n</table>");
        html
    }
}

impl Rich for Table {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::from([
            ("text/html".to_string(), self.html()),
            ("text/plain".to_string(), self.text()),
        ])
    }
}

pub(crate) fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Standard base64 with padding (what Jupyter expects for binary mime types).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn table_renders_text_and_escaped_html() {
        let t = Table::new(["field", "value"])
            .row(["a<b", "1"])
            .row(["long name", "2"]);
        let b = t.mime_bundle();
        assert_eq!(
            b["text/plain"],
            "field      value\n---------  -----\na<b        1\nlong name  2"
        );
        assert!(b["text/html"].contains("<td style=\"text-align:left\">a&lt;b</td>"));
    }

    #[test]
    fn table_from_a_serializable_struct() {
        #[derive(serde::Serialize)]
        struct C {
            hidden_size: usize,
            name: &'static str,
        }
        let t = Table::from_serialize(&C {
            hidden_size: 64,
            name: "tiny",
        });
        assert_eq!(
            t.rows,
            vec![vec!["hidden_size", "64"], vec!["name", "tiny"]]
        );
    }

    #[test]
    fn show_and_update_work_outside_the_kernel() {
        let d = show("hello");
        d.update(&Svg("<svg/>".into()));
        assert!(d.id().starts_with("peft-"));
    }
}
