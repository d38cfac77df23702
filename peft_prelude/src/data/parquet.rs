//! Parquet files, read by `tools/parquet-rows` in a child process.
//!
//! The Parquet reader and its codecs (zstd's C library among them) were an eighth of the
//! prelude's first build in the kernel's cache (issue 20), for one corner: the hub's datasets
//! converted to Parquet. The prelude instead builds that small tool with cargo the first time a
//! Parquet file is read (about a minute on 2 cores, once per machine) and reads its JSON lines.
//! A damaged file that makes the reader panic only ends the child.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The tool's package in this repository's workspace.
const PACKAGE: &str = "peft-parquet-rows";

/// The rows of a Parquet file, one JSON object per row.
pub fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let reader = reader_binary()?;
    let output = Command::new(&reader)
        .arg(path)
        .output()
        .map_err(|e| Error::io(&reader, e))?;
    if !output.status.success() {
        let reason = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(Error::corrupt(
            path,
            format!("not a readable Parquet file: {reason}"),
        ));
    }
    let text = std::str::from_utf8(&output.stdout)
        .map_err(|e| Error::corrupt(path, format!("the reader wrote invalid UTF-8: {e}")))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| match serde_json::from_str(line) {
            Ok(Value::Object(row)) => Ok(row),
            Ok(other) => Err(Error::corrupt(
                path,
                format!("row {i} is not a record: {other}"),
            )),
            Err(e) => Err(Error::corrupt(path, format!("row {i}: {e}"))),
        })
        .collect()
}

/// The tool: `$PEFT_PARQUET_READER` when set (the test scripts build it with the workspace),
/// else [`built_reader`].
pub fn reader_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PEFT_PARQUET_READER") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "PEFT_PARQUET_READER names no file",
                ),
            ))
        };
    }
    built_reader()
}

/// `~/.cache/peft-tools/release/peft-parquet-rows` (`$PEFT_TOOLS_DIR` replaces the folder),
/// built, or rebuilt when its source or manifest is newer than the binary.
pub fn built_reader() -> Result<PathBuf> {
    let target_dir = tools_dir();
    let binary = target_dir.join("release").join(PACKAGE);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // Its code and its manifest (a new parquet version); not the workspace's lock file, which
    // changes with every dependency of every crate.
    let written = ["src/main.rs", "Cargo.toml"]
        .iter()
        .filter_map(|f| modified(&tool_source().join(f)))
        .max();
    let fresh = match (modified(&binary), written) {
        (Some(built), Some(written)) => built >= written,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if !fresh {
        build(&target_dir)?;
    }
    Ok(binary)
}

/// `$PEFT_TOOLS_DIR`, else `~/.cache/peft-tools`: cargo's target folder for the tool.
fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PEFT_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/peft-tools")
}

/// Where the tool's crate is: beside this crate in the workspace it was compiled from.
fn tool_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/parquet-rows")
}

fn build(target_dir: &Path) -> Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    if !tool_source().join("Cargo.toml").is_file() {
        return Err(Error::Io {
            path: tool_source(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "reading Parquet needs tools/parquet-rows from the peft repository this prelude was built from",
            ),
        });
    }
    eprintln!(
        "peft_prelude: building the Parquet reader into {} (once per machine; about a minute on 2 cores)",
        target_dir.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--locked", "--quiet", "-p", PACKAGE])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        // A build folder or flags meant for another build (evcxr's, a user's) must not leak in.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_BUILD_DIR")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(|e| {
            Error::Io {
                path: manifest.clone(),
                source: std::io::Error::new(
                    e.kind(),
                    format!("reading Parquet builds tools/parquet-rows with cargo, which did not start: {e}"),
                ),
            }
        })?;
    if !output.status.success() {
        return Err(Error::Io {
            path: manifest,
            source: std::io::Error::other(format!(
                "building the Parquet reader failed:\n{}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
        });
    }
    Ok(())
}
