//! One error type for the whole prelude. Every variant that comes from a file names the file,
//! and every variant says what was expected, so a notebook user knows what to fix.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file exists but its content is not what it claims to be (truncated, corrupt,
    /// malformed JSON, a header that points past the end of the file ...).
    #[error("{}: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },

    /// The file is well formed but describes something we do not support
    /// (an architecture, a tensor type, a tokenizer model).
    #[error("{}: unsupported {what}", path.display())]
    Unsupported { path: PathBuf, what: String },

    /// A tensor the configuration requires is not in the checkpoint.
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor's shape disagrees with what the configuration implies.
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A caller passed an argument that cannot work (an empty prompt, a wrong shape ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A module path (`model.layers.3.self_attn.q_proj`) that the model does not have.
    #[error("unknown module `{name}`{}", close_matches_hint(.close_matches))]
    UnknownModule {
        name: String,
        close_matches: Vec<String>,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("hub: {0}")]
    Hub(String),

    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

fn close_matches_hint(matches: &[String]) -> String {
    if matches.is_empty() {
        String::new()
    } else {
        format!("; did you mean one of: {}?", matches.join(", "))
    }
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn corrupt(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
        }
    }

    pub fn unsupported(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
        }
    }
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is
/// set (a notebook user reads the message, not candle's stack).
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_message(inner))
        }
        other => other.to_string(),
    }
}

/// Runs `f`, turning a panic inside it (a dependency's, reached through a loader) into an
/// `Err` with the panic's message, so a bad file costs an error, never the process.
pub fn contain_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("its reader failed ({msg})")
    })
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Parses a JSON file into `T`, naming the file in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::corrupt(path, format!("invalid JSON: {e}")))
}
