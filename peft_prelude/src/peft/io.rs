//! Atomic file writes and safetensors I/O for adapters.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename,
/// so readers never see a partial file and a failed write leaves the old file in place.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    replace_atomically(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// [`write_atomic`] for writers that want a path: `write` creates and fills a temporary file
/// beside `path`, which is then synced and renamed over `path` (removed if anything fails).
pub fn replace_atomically(
    path: impl AsRef<Path>,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_stale_temporaries(dir, &format!(".{name}.tmp-"));
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write(&tmp).and_then(|()| {
        let sync_and_rename = || -> std::io::Result<()> {
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        sync_and_rename().map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes what writers killed mid-save left in `dir`: entries named `{prefix}{pid}` whose
/// process is gone (a live one may be another kernel writing the same file).
pub fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    remove_stale_temporaries_matching(
        dir,
        |name| Some((String::new(), name.strip_prefix(prefix)?.parse().ok()?)),
        |path, _| {
            let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
        },
    );
}

/// For each entry of `dir` that `parse` reads as (a tag, a writer's process id) whose process
/// is gone, calls `handle(path, tag)`.
pub fn remove_stale_temporaries_matching(
    dir: &Path,
    parse: impl Fn(&str) -> Option<(String, u32)>,
    handle: impl Fn(&Path, &str),
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((tag, pid)) = parse(&name) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            handle(&entry.path(), &tag);
        }
    }
}

/// Whether a process of that id runs (Linux: `/proc/{pid}`; elsewhere assumed alive, so
/// nothing is removed).
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// Saves tensors as safetensors with PEFT's metadata (`{"format": "pt"}`), atomically.
pub fn write_safetensors_atomic(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let path = path.as_ref();
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file onto the CPU, naming the file on any error.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    let path = path.as_ref();
    let bytes = crate::error::read_file(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::corrupt(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| Error::corrupt(path, format!("tensor `{name}`: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}
