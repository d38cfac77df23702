//! Greedy decoding throughput with the KV cache, batch 1, as one JSON line.
//!
//! ```text
//! cargo run --release -p peft_prelude --example bench_decode -- [MODEL] [NEW_TOKENS] [RUNS] [BASE]
//! ```
//! MODEL defaults to the SmolLM2-135M-Instruct GGUF fetched by `scripts/fetch-smollm2.sh`.
//! BASE: `dense-f32` (default: every weight dequantized to f32 at load) or `gguf-kept` (the
//! projections stay in the file's GGML types and run as quantized matmuls on Q8 activations)
//! or `nf4` (bitsandbytes' NF4 with double quantization, as `load_in_4bit` in the notebook).
//! Thread count: `RAYON_NUM_THREADS` (default: all cores).

use std::time::Instant;

use candle_core::{Device, Tensor};
use peft_prelude::generate::sampling::argmax;
use peft_prelude::model::{Forward, LoadOptions, Pretrained};
use peft_prelude::quant::Quantization;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| peft_prelude::setup::smollm2().display().to_string());
    let new_tokens: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let runs: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let base = args.next().unwrap_or_else(|| "dense-f32".into());
    let quantization = match base.as_str() {
        "dense-f32" => Quantization::None,
        "gguf-kept" => Quantization::KeepGguf,
        "nf4" => Quantization::QLORA,
        other => anyhow::bail!("BASE is dense-f32, gguf-kept or nf4, got {other}"),
    };

    let t0 = Instant::now();
    let p = Pretrained::load(
        &model_path,
        &LoadOptions::default().with_quantization(quantization),
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = p
        .tokenizer
        .encode("The history of the Roman Empire began when", true)?;

    let mut decode_rates = vec![];
    let mut prefill_s = vec![];
    for _ in 0..runs {
        let mut cache = p.model.new_cache();
        let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let t = Instant::now();
        let logits = p
            .model
            .forward_last(Forward::ids(&ids).with_cache(&mut cache))?;
        let mut next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        prefill_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 1..new_tokens {
            let ids = Tensor::new(&[[next]], &Device::Cpu)?;
            let logits = p
                .model
                .forward_last(Forward::ids(&ids).with_cache(&mut cache))?;
            next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        }
        decode_rates.push((new_tokens - 1) as f64 / t.elapsed().as_secs_f64());
    }
    decode_rates.sort_by(f64::total_cmp);
    prefill_s.sort_by(f64::total_cmp);
    let weights_bytes: usize = p
        .model
        .linear_paths()
        .iter()
        .filter_map(|path| p.model.linear(path).ok())
        .map(|l| l.base().weight_bytes())
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "bench": "greedy_decode",
            "model": model_path,
            "base": base,
            "threads": rayon::current_num_threads(),
            "prompt_tokens": prompt.len(),
            "new_tokens": new_tokens,
            "runs": runs,
            "decode_tokens_per_s_median": decode_rates[runs / 2],
            "decode_tokens_per_s_all": decode_rates,
            "prefill_s_median": prefill_s[runs / 2],
            "linear_weight_mb": weights_bytes as f64 / 1e6,
            "load_s": load_s,
        })
    );
    Ok(())
}
