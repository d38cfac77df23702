//! The kernelspec: `peft-kernel install` / `uninstall`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

pub const KERNEL_NAME: &str = "rust-peft";
pub const DISPLAY_NAME: &str = "Rust (PEFT)";

const LOGO_32: &[u8] = include_bytes!("../assets/logo-32x32.png");
const LOGO_64: &[u8] = include_bytes!("../assets/logo-64x64.png");
const LOGO_SVG: &[u8] = include_bytes!("../assets/logo-svg.svg");

/// Where kernelspecs go, as Jupyter defines it.
#[derive(Debug, Clone)]
pub enum Location {
    User,
    SysPrefix,
    Prefix(PathBuf),
}

impl Location {
    /// The Jupyter data directory.
    pub fn data_dir(&self) -> Result<PathBuf> {
        Ok(match self {
            Location::User => match std::env::var_os("JUPYTER_DATA_DIR") {
                Some(dir) => PathBuf::from(dir),
                None => home()?.join(".local/share/jupyter"),
            },
            Location::SysPrefix => python_prefix()?.join("share/jupyter"),
            Location::Prefix(p) => p.join("share/jupyter"),
        })
    }

    pub fn kernel_dir(&self) -> Result<PathBuf> {
        Ok(self.data_dir()?.join("kernels").join(KERNEL_NAME))
    }
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// `sys.prefix` of the Python that runs Jupyter (`$PYTHON`, else `python3`).
fn python_prefix() -> Result<PathBuf> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .with_context(|| format!("running {python} to find sys.prefix"))?;
    if !out.status.success() {
        bail!("{python} could not print sys.prefix");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Writes the kernelspec; returns its directory.
pub fn install(location: &Location, binary: &Path, prelude: &Path) -> Result<PathBuf> {
    let dir = location.kernel_dir()?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = json!({
        "argv": [binary, "start", "--connection-file", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "rust",
        "interrupt_mode": "message",
        "env": { "PEFT_PRELUDE_PATH": prelude },
        "metadata": { "peft_kernel": { "version": env!("CARGO_PKG_VERSION") } },
    });
    fs::write(
        dir.join("kernel.json"),
        serde_json::to_string_pretty(&spec)? + "\n",
    )?;
    fs::write(dir.join("logo-32x32.png"), LOGO_32)?;
    fs::write(dir.join("logo-64x64.png"), LOGO_64)?;
    fs::write(dir.join("logo-svg.svg"), LOGO_SVG)?;
    Ok(dir)
}

/// Removes the kernelspec; returns the directory when there was one.
pub fn uninstall(location: &Location) -> Result<Option<PathBuf>> {
    let dir = location.kernel_dir()?;
    if !dir.exists() {
        return Ok(None);
    }
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(Some(dir))
}
