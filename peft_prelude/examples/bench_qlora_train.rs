//! Tokens/s of one LoRA training step (forward, loss, backward) on a real model with the base
//! held three ways: dense f32, NF4 (QLoRA, double quantization) and the GGUF file's own type.
//! Prints one JSON line per base.
//!
//! ```text
//! cargo run --release -p peft_prelude --example bench_qlora_train -- [MODEL] [BATCH] [SEQ] [STEPS] [BASES]
//! ```
//! MODEL defaults to the SmolLM2-135M-Instruct Q4_1 GGUF; BASES is a comma-separated subset of
//! `dense-f32,nf4-double-quant,gguf-kept` (all by default); thread count: `RAYON_NUM_THREADS`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig};
use peft_prelude::quant::Quantization;
use peft_prelude::train::causal_lm_loss;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| peft_prelude::setup::smollm2().display().to_string());
    let batch: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4);
    let seq: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(256);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let only = args
        .next()
        .unwrap_or_else(|| "dense-f32,nf4-double-quant,gguf-kept".into());

    for (label, quantization) in [
        ("dense-f32", Quantization::None),
        ("nf4-double-quant", Quantization::QLORA),
        ("gguf-kept", Quantization::KeepGguf),
    ] {
        if !only.split(',').any(|o| o == label) {
            continue;
        }
        let options = LoadOptions::default().with_quantization(quantization);
        let p = Pretrained::load(&model_path, &options)?;
        let vocab = p.model.config().vocab_size as u64;
        let base_bytes: usize = p
            .model
            .linear_paths()
            .iter()
            .filter(|l| *l != "lm_head")
            .map(|l| {
                p.model
                    .linear(l)
                    .map(|x| x.base().weight_bytes())
                    .unwrap_or(0)
            })
            .sum();
        let peft = get_peft_model(p.model, LoraConfig::all_projections(16, 16.0))?;
        peft.train();
        let mut state = 12345u64;
        let ids: Vec<u32> = (0..batch * seq)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % vocab) as u32
            })
            .collect();
        let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?;
        let labels = ids.to_dtype(DType::I64)?;
        let mut times = vec![];
        for step in 0..=steps {
            let t = Instant::now();
            let logits = peft.forward(&ids)?;
            let (loss, _) = causal_lm_loss(&logits, &labels)?;
            let grads = loss.backward()?;
            let n = peft
                .trainable_vars()
                .iter()
                .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
                .count();
            anyhow::ensure!(
                n == peft.trainable_vars().len(),
                "every adapter gets a gradient"
            );
            if step > 0 {
                times.push(t.elapsed().as_secs_f64()); // step 0 warms up
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{}",
            serde_json::json!({
                "base": label,
                "batch": batch,
                "seq": seq,
                "threads": rayon::current_num_threads(),
                "step_seconds": times,
                "tokens_per_second": (batch * seq) as f64 / median,
                "projection_bytes": base_bytes,
            })
        );
    }
    Ok(())
}
