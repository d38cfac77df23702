//! Where things are on this machine, so notebook cells need no set-up code of their own: the
//! accelerator, the folder of downloaded models, the example data shipped with the project.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::LoadOptions;

/// Whether a CUDA GPU is usable (the prelude built with the `cuda` feature and a device 0).
pub fn has_cuda() -> bool {
    Device::cuda_if_available(0).is_ok_and(|d| d.is_cuda())
}

/// CUDA device 0 when there is one, else the CPU.
pub fn best_device() -> Device {
    Device::cuda_if_available(0).unwrap_or(Device::Cpu)
}

/// Where downloaded models live: `$PEFT_MODELS_DIR`, else `~/.cache/peft-models` (where
/// `scripts/fetch-smollm2.sh` puts the small CPU model).
pub fn models_dir() -> PathBuf {
    match std::env::var_os("PEFT_MODELS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => home().join(".cache/peft-models"),
    }
}

/// The SmolLM2-135M-Instruct GGUF that `scripts/fetch-smollm2.sh` downloads (the notebooks'
/// model on a CPU).
pub fn smollm2() -> PathBuf {
    models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A file of the project's example data (`notebooks/data/<name>`), found from the notebook's
/// folder, the repository root, or where this crate was built from.
pub fn example_data(name: &str) -> Result<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../notebooks/data");
    let candidates = [
        PathBuf::from("data"),
        PathBuf::from("notebooks/data"),
        PathBuf::from("../notebooks/data"),
        here,
    ];
    candidates
        .iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::io(
                name,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "example data not found in {} (start Jupyter in the repository)",
                        candidates
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            )
        })
}

impl LoadOptions {
    /// Puts the model on `device`, in the precision that suits it: bf16 activations on a GPU,
    /// f32 on a CPU.
    pub fn on(mut self, device: Device) -> Self {
        self.dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        self.device = device;
        self
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_data_is_found_and_a_missing_file_is_named() {
        assert!(example_data("mood_train.json").unwrap().is_file());
        let err = example_data("no_such.json").unwrap_err().to_string();
        assert!(
            err.contains("no_such.json") && err.contains("notebooks/data"),
            "{err}"
        );
    }

    #[test]
    fn cpu_options_stay_f32() {
        let o = LoadOptions::load_in_4bit().on(Device::Cpu);
        assert_eq!(o.dtype, DType::F32);
        assert!(o.device.is_cpu());
    }
}
