//! Our half of the interoperability check with Python PEFT and transformers
//! (`scripts/interop-check.sh` drives both halves and compares).
//!
//! ```text
//! interop_peft save MODEL_DIR OUT_DIR METHOD
//!     METHOD: `lora` (r=8, alpha 16, all seven projections), `qlora` (the same on the base
//!     quantized to NF4 with double quantization as it loads), `dora` (LoRA with rsLoRA and
//!     DoRA), `ia3` (k, v, down), `prompt` (prompt tuning), `prefix` (prefix tuning) or
//!     `ptuning` (P-tuning, MLP encoder); 8 virtual tokens for the last three. Trained for three
//!     AdamW steps so the adapter is not the identity; writes OUT_DIR/adapter
//!     (save_pretrained) and the adapted logits OUT_DIR/ours.safetensors. For the mergeable
//!     methods also the merged model exported as a 16-bit Hugging Face directory OUT_DIR/merged
//!     (F16) and the logits of that export read back by our loader,
//!     OUT_DIR/ours_merged.safetensors.
//! interop_peft load MODEL_DIR ADAPTER_DIR OUT_FILE [qlora]
//!     Loads an adapter Python PEFT saved (onto the NF4-quantized base with `qlora`) and writes
//!     the adapted logits to OUT_FILE.
//! ```
//! Logits are for [`probe_ids`]: the same ids the Python half computes (key `logits`, f32
//! `[1, PROBE_LEN, vocab]`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_prelude::data::{pad_batch, Example};
use peft_prelude::model::{Checkpointing, LoadOptions, Model, Pretrained};
use peft_prelude::peft::{
    get_peft_model, Ia3Config, LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig,
    PromptEncoderConfig, PromptLearningCommon, PromptTuningConfig,
};
use peft_prelude::quant::Quantization;
use peft_prelude::train::sft::batch_gradients;
use peft_prelude::train::{AdamW, AdamWConfig};

const PROBE_LEN: usize = 24;

/// `(i·2654435761 + 7) mod vocab` for i < PROBE_LEN (scripts/interop_peft.py computes the same).
fn probe_ids(vocab: usize) -> Vec<u32> {
    (0..PROBE_LEN as u64)
        .map(|i| ((i * 2_654_435_761 + 7) % vocab as u64) as u32)
        .collect()
}

fn write_logits(logits: &Tensor, path: &Path) -> anyhow::Result<()> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    candle_core::safetensors::save(&HashMap::from([("logits", logits)]), path)?;
    Ok(())
}

fn logits_of(model: &Model) -> anyhow::Result<Tensor> {
    let ids = Tensor::new(probe_ids(model.config().vocab_size), &Device::Cpu)?.unsqueeze(0)?;
    Ok(model.forward(&ids)?)
}

fn adapted_logits(peft: &PeftModel, vocab: usize) -> anyhow::Result<Tensor> {
    let ids = Tensor::new(probe_ids(vocab), &Device::Cpu)?.unsqueeze(0)?;
    Ok(peft.forward(&ids)?)
}

/// Three AdamW steps on pseudo-text, so every B moves away from its zero initialisation.
fn train_a_little(peft: &PeftModel, vocab: usize) -> anyhow::Result<()> {
    peft.train();
    let params = peft.trainable_vars();
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
    )?;
    let (batch, seq) = (2, 32);
    let examples: Vec<Example> = (0..batch)
        .map(|b| {
            let row: Vec<u32> = (0..seq)
                .map(|i| ((b * seq + i) as u64 * 40_503 % vocab as u64) as u32)
                .collect();
            Example {
                labels: row.iter().map(|&i| i as i64).collect(),
                input_ids: row,
            }
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let data = pad_batch(&refs, 0, &Device::Cpu)?;
    let vars: Vec<_> = params.iter().map(|(_, v)| v.clone()).collect();
    for _ in 0..3 {
        let (_, _, grads) = batch_gradients(
            peft,
            &data,
            1.0 / (batch * (seq - 1)) as f64,
            &vars,
            Checkpointing::Off,
        )?;
        opt.step(&grads)?;
    }
    peft.eval();
    Ok(())
}

fn method_config(method: &str) -> anyhow::Result<PeftConfig> {
    let virtual_tokens = PromptLearningCommon {
        num_virtual_tokens: 8,
        ..Default::default()
    };
    Ok(match method {
        "lora" | "qlora" => LoraConfig::all_projections(8, 16.0).into(),
        "dora" => LoraConfig {
            use_dora: true,
            use_rslora: true,
            ..LoraConfig::all_projections(8, 16.0)
        }
        .into(),
        "ia3" => Ia3Config::default().into(),
        "prompt" => PromptTuningConfig {
            prompt: virtual_tokens,
            ..Default::default()
        }
        .into(),
        "prefix" => PrefixTuningConfig {
            prompt: virtual_tokens,
            ..Default::default()
        }
        .into(),
        "ptuning" => PromptEncoderConfig {
            prompt: virtual_tokens,
            encoder_hidden_size: Some(64),
            ..Default::default()
        }
        .into(),
        other => anyhow::bail!("unknown method {other} (lora, dora, ia3, prompt, prefix, ptuning)"),
    })
}

/// The base model, quantized to NF4 (double quantization, as bitsandbytes' QLoRA setting) for
/// `qlora`.
fn base(model_dir: &Path, method: &str) -> anyhow::Result<Pretrained> {
    let quantization = if method == "qlora" {
        Quantization::QLORA
    } else {
        Quantization::None
    };
    Ok(Pretrained::load(
        model_dir,
        &LoadOptions::default().with_quantization(quantization),
    )?)
}

fn save(model_dir: &Path, out: &Path, method: &str) -> anyhow::Result<()> {
    let p = base(model_dir, method)?;
    let vocab = p.model.config().vocab_size;
    let peft = get_peft_model(p.model, method_config(method)?)?;
    train_a_little(&peft, vocab)?;
    std::fs::create_dir_all(out)?;
    peft.save_pretrained(out.join("adapter"))?;
    write_logits(
        &adapted_logits(&peft, vocab)?,
        &out.join("ours.safetensors"),
    )?;
    if matches!(method, "prompt" | "prefix" | "ptuning") {
        return Ok(()); // nothing to merge
    }
    // Unsloth's merged_16bit: merged in f32 over the dequantized base (QLoRA included).
    peft.save_pretrained_merged(out.join("merged"), &p.tokenizer, "merged_16bit")?;
    let again = Pretrained::load(out.join("merged"), &LoadOptions::default())?;
    write_logits(
        &logits_of(&again.model)?,
        &out.join("ours_merged.safetensors"),
    )?;
    Ok(())
}

fn load(model_dir: &Path, adapter: &Path, out_file: &Path, method: &str) -> anyhow::Result<()> {
    let p = base(model_dir, method)?;
    let vocab = p.model.config().vocab_size;
    let peft = PeftModel::from_pretrained(p.model, adapter)?;
    write_logits(&adapted_logits(&peft, vocab)?, out_file)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = |i: usize| -> anyhow::Result<PathBuf> {
        args.get(i)
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("missing argument {i}; see the example's doc"))
    };
    match args.first().map(String::as_str) {
        Some("save") => save(
            &path(1)?,
            &path(2)?,
            args.get(3).map_or("lora", String::as_str),
        ),
        Some("load") => load(
            &path(1)?,
            &path(2)?,
            &path(3)?,
            args.get(4).map_or("lora", String::as_str),
        ),
        _ => anyhow::bail!(
            "usage: interop_peft save MODEL_DIR OUT_DIR METHOD | load MODEL_DIR ADAPTER_DIR OUT_FILE [qlora]"
        ),
    }
}
