//! One LoRA training configuration timed: forward + loss + backward + AdamW step, as one JSON
//! line (tokens/s, median step time, peak RSS, parameter counts).
//!
//! ```text
//! cargo run --release -p peft_prelude --example bench_lora_step -- [--batch 4] [--seq 256]
//!     [--steps 8] [--warmup 2] [--rank 16] [--unprotected] [--gradient-checkpointing]
//!     [--checkpoint-layers N] [--integer-products on|off] [--base dense-f32|nf4|gguf-kept]
//!     [--model PATH]
//! ```
//! Default: SmolLM2-135M-Instruct (the GGUF fetched by `scripts/fetch-smollm2.sh`, weights
//! dequantized to f32), LoRA r=16 alpha=16 on q,k,v,o,gate,up,down, AdamW lr 2e-4.
//! `--unprotected` lets candle compute and keep gradients for the frozen weights (its default
//! matmul backward), to measure what the frozen-weight protection saves.
//! `--gradient-checkpointing` keeps only each layer's input and recomputes its activations in
//! backward; `--checkpoint-layers N` recomputes only the first N layers (implies
//! checkpointing). `--base`: the frozen projections dense in f32 (default), NF4 with double
//! quantization (QLoRA), or kept in the GGUF's own types (`gguf-kept`: Q4_1 here). A quantized
//! base trains on the integer GEMM (8-bit blocks, AVX512-VNNI) where the CPU has it;
//! `--integer-products off` dequantizes it to f32 for every product instead.

use std::time::Instant;

use candle_core::Device;
use peft_prelude::data::{pad_batch, Example};
use peft_prelude::model::Checkpointing;
use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig};
use peft_prelude::quant::Quantization;
use peft_prelude::train::sft::batch_gradients;
use peft_prelude::train::{AdamW, AdamWConfig};

/// A `/proc/self/status` field (`VmHWM:`, `VmRSS:`, …) in MiB.
fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// The resident set now, split as the kernel counts it: anonymous memory and mapped files.
fn rss_now_mb() -> serde_json::Value {
    serde_json::json!({
        "total": status_mb("VmRSS:"),
        "anon": status_mb("RssAnon:"),
        "file": status_mb("RssFile:"),
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut batch, mut seq, mut steps, mut warmup, mut rank) =
        (4usize, 256usize, 8usize, 2usize, 16usize);
    let mut protected = true;
    let mut checkpointing = Checkpointing::Off;
    let mut base = "dense-f32".to_string();
    let mut model_path = peft_prelude::setup::smollm2().display().to_string();
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--batch" => batch = value()?.parse()?,
            "--seq" => seq = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            "--warmup" => warmup = value()?.parse()?,
            "--rank" => rank = value()?.parse()?,
            "--model" => model_path = value()?,
            "--unprotected" => protected = false,
            "--gradient-checkpointing" => checkpointing = Checkpointing::All,
            "--checkpoint-layers" => checkpointing = Checkpointing::FirstLayers(value()?.parse()?),
            "--integer-products" => peft_prelude::quant::set_integer_products(value()? == "on"),
            "--base" => base = value()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    peft_kernels::frozen::set_weight_gradient_protection(protected);
    let quantization = match base.as_str() {
        "dense-f32" => Quantization::None,
        "nf4" => Quantization::QLORA,
        "gguf-kept" => Quantization::KeepGguf,
        other => anyhow::bail!("--base is dense-f32, nf4 or gguf-kept, got {other}"),
    };
    let p = Pretrained::load(
        &model_path,
        &LoadOptions::default().with_quantization(quantization),
    )?;
    let vocab = p.model.config().vocab_size as u32;
    let rss_after_load = peak_rss_mb();
    let rss_now_after_load = rss_now_mb();
    // The step's memory, as the reference script measures it: it loads no tokenizer (ours
    // comes with the GGUF, 16 MiB for SmolLM2's).
    drop(p.tokenizer);
    let peft = get_peft_model(p.model, LoraConfig::all_projections(rank, rank as f64))?;
    // Training mode, as the trainers set it (dropout acts; quantized bases take the integer
    // products).
    peft.train();
    let params = peft.trainable_vars();
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let total = peft.model().num_parameters() + trainable;
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            lr: 2e-4,
            ..Default::default()
        },
    )?;
    // Deterministic pseudo-text: every position is a label.
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32)
        .collect();
    let examples: Vec<Example> = ids
        .chunks(seq)
        .map(|row| Example {
            input_ids: row.to_vec(),
            labels: row.iter().map(|&i| i as i64).collect(),
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch_data = pad_batch(&refs, 0, &Device::Cpu)?;
    let mut times = vec![];
    for step in 0..warmup + steps {
        let t = Instant::now();
        // What the SFT trainer computes: the head fused into a chunked cross-entropy.
        let vars: Vec<_> = params.iter().map(|(_, v)| v.clone()).collect();
        let (_, _, g) = batch_gradients(
            &peft,
            &batch_data,
            1.0 / (batch * seq - batch) as f64,
            &vars,
            checkpointing,
        )?;
        opt.step(&g)?;
        if step >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "bench": "lora_train_step",
            "model": model_path,
            "dtype": "f32",
            "base": base,
            "frozen_weight_protection": protected,
            "gradient_checkpointing": format!("{checkpointing:?}"),
            "integer_products": peft_prelude::quant::integer_products() && base != "dense-f32",
            // Whether the fused loss multiplied by the head on integer products too.
            "integer_head": peft.model().holds_integer_head(),
            "batch": batch,
            "seq": seq,
            "rank": rank,
            "threads": rayon::current_num_threads(),
            "timed_steps": steps,
            "step_s_median": median,
            "tokens_per_s": (batch * seq) as f64 / median,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_after_load_mb": rss_after_load,
            "rss_after_load_mb": rss_now_after_load,
            "trainable_params": trainable,
            "total_params": total,
        })
    );
    Ok(())
}
