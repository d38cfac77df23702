//! Prompt processing (prefill) and batched generation throughput, as JSON lines.
//!
//! ```text
//! cargo run --release -p peft_prelude --example bench_prefill -- [MODEL] [BASE] [PROMPT_TOKENS] [RUNS] [prefill-only]
//! ```
//! MODEL defaults to the SmolLM2-135M-Instruct GGUF fetched by `scripts/fetch-smollm2.sh`.
//! BASE: `dense-f32` (default), `gguf-kept` or `nf4`, as in `bench_decode`. PROMPT_TOKENS defaults to
//! 512 (llama.cpp's `llama-bench -p 512`): one prompt, batch 1, through the KV cache, timed to
//! the logits of its last token. The second line is batched generation as evaluation during
//! training runs it: 8 different prompts, left-padded into one batch, 64 new greedy tokens each
//! (EOS ignored so every row makes all 64), tokens/s over the whole call (prefill included).
//! `prefill-only` skips the generation line (to profile the prompt alone).
//! Thread count: `RAYON_NUM_THREADS` (default: all cores).

use std::time::Instant;

use candle_core::{Device, Tensor};
use peft_prelude::generate::{generate_ids, GenerationConfig, Hooks};
use peft_prelude::model::{Forward, LoadOptions, Pretrained};
use peft_prelude::quant::Quantization;

const TEXT: &str = "The history of the Roman Empire began when Augustus became the first \
emperor in 27 BC. Over the following centuries the empire grew to cover the whole \
Mediterranean, with roads, aqueducts and cities that still stand today. Trade carried grain \
from Egypt, wine from Gaul and silver from Spain. ";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| peft_prelude::setup::smollm2().display().to_string());
    let base = args.next().unwrap_or_else(|| "dense-f32".into());
    let prompt_tokens: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(512);
    let runs: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let prefill_only = match args.next().as_deref() {
        None => false,
        Some("prefill-only") => true,
        Some(other) => anyhow::bail!("the fifth argument is `prefill-only`, got {other}"),
    };
    let quantization = match base.as_str() {
        "dense-f32" => Quantization::None,
        "gguf-kept" => Quantization::KeepGguf,
        "nf4" => Quantization::QLORA,
        other => anyhow::bail!("BASE is dense-f32, gguf-kept or nf4, got {other}"),
    };
    let p = Pretrained::load(
        &model_path,
        &LoadOptions::default().with_quantization(quantization),
    )?;

    // A prompt of exactly `prompt_tokens` tokens: the text repeated, cut.
    let mut ids = p.tokenizer.encode(&TEXT.repeat(64), true)?;
    anyhow::ensure!(ids.len() >= prompt_tokens, "text too short for the prompt");
    ids.truncate(prompt_tokens);
    let mut prefill_rates = vec![];
    for _ in 0..runs {
        let mut cache = p.model.new_cache();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let t = Instant::now();
        let logits = p
            .model
            .forward_last(Forward::ids(&input).with_cache(&mut cache))?;
        logits.to_vec2::<f32>()?;
        prefill_rates.push(prompt_tokens as f64 / t.elapsed().as_secs_f64());
    }
    prefill_rates.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "bench": "prefill",
            "model": model_path,
            "base": base,
            "threads": rayon::current_num_threads(),
            "prompt_tokens": prompt_tokens,
            "runs": runs,
            "prompt_tokens_per_s_median": prefill_rates[runs / 2],
            "prompt_tokens_per_s_all": prefill_rates,
        })
    );
    if prefill_only {
        return Ok(());
    }

    // Batched generation: 8 prompts of different lengths (12 to 47 words).
    let words: Vec<&str> = TEXT.split_whitespace().collect();
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            let text: Vec<&str> = (0..12 + 5 * i)
                .map(|j| words[(i + j) % words.len()])
                .collect();
            p.tokenizer.encode(&text.join(" "), true)
        })
        .collect::<Result<_, _>>()?;
    let mut config = GenerationConfig::default().greedy(64);
    config.eos_token_ids.clear();
    let mut batch_rates = vec![];
    let mut single_rates = vec![];
    for _ in 0..runs {
        let g = generate_ids(&p.model, &p.tokenizer, &prompts, &config, Hooks::default())?;
        anyhow::ensure!(g.new_tokens == 8 * 64, "made {} tokens", g.new_tokens);
        batch_rates.push(g.tokens_per_second());
        // The same 8 prompts one after another, for the gain of batching.
        let t = Instant::now();
        for prompt in &prompts {
            generate_ids(
                &p.model,
                &p.tokenizer,
                std::slice::from_ref(prompt),
                &config,
                Hooks::default(),
            )?;
        }
        single_rates.push(8.0 * 64.0 / t.elapsed().as_secs_f64());
    }
    batch_rates.sort_by(f64::total_cmp);
    single_rates.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "bench": "batched_generation",
            "model": model_path,
            "base": base,
            "threads": rayon::current_num_threads(),
            "prompts": 8,
            "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(),
            "new_tokens_each": 64,
            "runs": runs,
            "batched_tokens_per_s_median": batch_rates[runs / 2],
            "one_by_one_tokens_per_s_median": single_rates[runs / 2],
        })
    );
    Ok(())
}
