//! The GPU check (`scripts/gpu-check.sh`): every fused op against its reference, then a QLoRA
//! training benchmark on a Mistral-7B-shaped model with random weights.
//!
//! ```text
//! gpu_check [--cpu | --dry-gpu] [--no-bench] [--bench-only] [--steps 10] [--batch 2] [--seq 2048]
//! ```
//! * default (a `--features cuda` build on a GPU machine): CUDA ops in f32 and bf16 against
//!   the CPU ops, then the benchmark on the GPU: 4-bit NF4 base (double quantization), LoRA
//!   r=16 alpha=16 on all seven projections, bf16 activations, f32 adapters and AdamW state,
//!   gradient checkpointing, batch 2 x 2048, 10 timed steps after one warm-up step;
//! * `--cpu`: the CPU ops against plain candle compositions, then the same benchmark code on a
//!   tiny model of the same structure on the CPU (what CI runs);
//!
//! The benchmark prints one JSON line: step time, tokens/s, peak GPU memory. No network.

mod ops;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use peft_prelude::data::{pad_batch, Example};
use peft_prelude::model::config::Architecture;
use peft_prelude::model::decoder::{LayerWeights, ModelWeights};
use peft_prelude::model::{FrozenLinear, Model, ModelConfig};
use peft_prelude::peft::{get_peft_model, LoraConfig};
use peft_prelude::quant::{Absmax, Nf4Matrix, Nf4Weight, NF4_CODE};
use peft_prelude::train::sft::batch_gradients;
use peft_prelude::train::{clip_grad_norm, AdamW, AdamWConfig};

struct Args {
    cpu: bool,
    dry_gpu: bool,
    ops: bool,
    bench: bool,
    steps: usize,
    batch: usize,
    seq: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        cpu: false,
        dry_gpu: false,
        ops: true,
        bench: true,
        steps: 10,
        batch: 2,
        seq: 2048,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || -> anyhow::Result<usize> {
            Ok(it
                .next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))?
                .parse()?)
        };
        match arg.as_str() {
            "--cpu" => a.cpu = true,
            "--dry-gpu" => a.dry_gpu = true,
            "--no-bench" => a.bench = false,
            "--bench-only" => a.ops = false,
            "--steps" => a.steps = value()?,
            "--batch" => a.batch = value()?,
            "--seq" => a.seq = value()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if args.ops {
        let failures = ops::check_all(args.cpu, args.dry_gpu)?;
        if failures > 0 {
            anyhow::bail!("gpu_check: {failures} op mismatches");
        }
    }
    if args.bench {
        let on_cpu = args.cpu || args.dry_gpu;
        let (device, config, batch, seq) = if on_cpu {
            (Device::Cpu, tiny_mistral_shape(), 2, 64)
        } else {
            (
                Device::new_cuda(0)?,
                ModelConfig::mistral_7b(),
                args.batch,
                args.seq,
            )
        };
        let steps = if on_cpu { 2 } else { args.steps };
        qlora_benchmark(&device, config, batch, seq, steps)?;
    }
    Ok(())
}

/// The structure of Mistral 7B (GQA 4:1, SwiGLU, untied head) at a size the CPU trains in
/// seconds.
fn tiny_mistral_shape() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Mistral,
        vocab_size: 1000,
        hidden_size: 256,
        intermediate_size: 896,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 32,
        ..ModelConfig::mistral_7b()
    }
}

/// A frozen NF4 projection with random codes and double-quantized scales, made directly in
/// the packed format (quantizing 7B random floats on the host would take minutes).
fn random_nf4(
    rows: usize,
    cols: usize,
    dtype: DType,
    device: &Device,
    seed: &mut u64,
) -> anyhow::Result<FrozenLinear> {
    let n = rows * cols;
    let packed = if device.is_cpu() {
        let bytes: Vec<u8> = (0..n.div_ceil(2))
            .map(|_| (next(seed) >> 56) as u8)
            .collect();
        Tensor::from_vec(bytes, n.div_ceil(2), device)?
    } else {
        Tensor::rand(0f32, 255.99, n.div_ceil(2), device)?.to_dtype(DType::U8)?
    };
    let blocks = n.div_ceil(64);
    let codes: Vec<u8> = (0..blocks).map(|_| (next(seed) >> 56) as u8).collect();
    // absmax = map[code] * 0.01 + 0.03: block maxima of about 0.02..0.04, as trained weights.
    let absmax = Absmax::Nested {
        codes,
        code_map: peft_prelude::quant::dynamic_map::dynamic_map_signed(),
        nested_absmax: vec![0.01; blocks.div_ceil(256)],
        nested_blocksize: 256,
        offset: 0.03,
    };
    let m = Nf4Matrix::new(packed, absmax, NF4_CODE, 64, rows, cols)?;
    Ok(FrozenLinear::quantized(
        Arc::new(Nf4Weight::from_matrix(m, dtype)),
        None,
    ))
}

fn next(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state
}

fn random_model(c: &ModelConfig, dtype: DType, device: &Device) -> anyhow::Result<Model> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let mut seed = 7u64;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for _ in 0..c.num_hidden_layers {
        let shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
        let projections: Vec<FrozenLinear> = shapes
            .iter()
            .map(|&(r, k)| random_nf4(r, k, dtype, device, &mut seed))
            .collect::<anyhow::Result<_>>()?;
        layers.push(LayerWeights {
            input_layernorm: Tensor::ones(h, dtype, device)?,
            post_attention_layernorm: Tensor::ones(h, dtype, device)?,
            projections,
            qk_norms: None,
            feedforward_norms: None,
        });
    }
    let table = |rows: usize| -> anyhow::Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02, (rows, h), device)?.to_dtype(dtype)?)
    };
    let weights = ModelWeights {
        embed_tokens: table(c.vocab_size)?,
        layers,
        norm: Tensor::ones(h, dtype, device)?,
        lm_head: Some(table(c.vocab_size)?),
    };
    Ok(Model::new(c.clone(), weights)?)
}

/// Bytes in use on the GPU now (free/total from the driver); `None` on the CPU.
fn gpu_used_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        return mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as u64);
    }
    let _ = device;
    None
}

fn qlora_benchmark(
    device: &Device,
    config: ModelConfig,
    batch: usize,
    seq: usize,
    steps: usize,
) -> anyhow::Result<()> {
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let idle = gpu_used_bytes(device);
    let t_load = Instant::now();
    let model = random_model(&config, dtype, device)?;
    device.synchronize()?;
    let load_s = t_load.elapsed().as_secs_f64();
    eprintln!("random NF4 model built in {load_s:.1} s");
    let after_load = gpu_used_bytes(device);
    let base_bytes: usize = model
        .linear_paths()
        .iter()
        .filter(|p| *p != "lm_head")
        .map(|p| {
            model
                .linear(p)
                .map(|l| l.base().weight_bytes())
                .unwrap_or(0)
        })
        .sum();
    let peft = get_peft_model(model, LoraConfig::all_projections(16, 16.0))?;
    peft.train();
    let params = peft.trainable_vars();
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            lr: 2e-4,
            ..Default::default()
        },
    )?;
    let mut seed = 11u64;
    let examples: Vec<Example> = (0..batch)
        .map(|_| {
            let ids: Vec<u32> = (0..seq)
                .map(|_| (next(&mut seed) >> 33) as u32 % config.vocab_size as u32)
                .collect();
            Example {
                labels: ids.iter().map(|&i| i as i64).collect(),
                input_ids: ids,
            }
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let data = pad_batch(&refs, 0, device)?;
    let label_tokens = batch * (seq - 1);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut peak = after_load.unwrap_or(0);
    for step in 0..=steps {
        let t = Instant::now();
        let (loss, _, mut grads) =
            batch_gradients(&peft, &data, 1.0 / label_tokens as f64, &vars, true)?;
        peak = peak.max(gpu_used_bytes(device).unwrap_or(0));
        let arrived = grads.iter().filter(|g| g.is_some()).count();
        anyhow::ensure!(
            arrived == vars.len(),
            "{arrived} of {} adapters got a gradient",
            vars.len()
        );
        clip_grad_norm(&mut grads, 1.0)?;
        opt.step(&grads)?;
        drop(grads);
        device.synchronize()?;
        peak = peak.max(gpu_used_bytes(device).unwrap_or(0));
        anyhow::ensure!(loss.is_finite(), "loss {loss} at step {step}");
        losses.push(loss);
        eprintln!(
            "step {step}: loss {loss:.4}, {:.2} s, GPU memory {:.1} GiB",
            t.elapsed().as_secs_f64(),
            peak as f64 / (1u64 << 30) as f64
        );
        if step > 0 {
            times.push(t.elapsed().as_secs_f64()); // step 0 warms up (PTX load, cuBLAS plans)
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "qlora_train_step",
            "device": if device.is_cpu() { "cpu".to_string() } else { "cuda:0".to_string() },
            "model": if device.is_cpu() { "tiny (Mistral structure)" } else { "Mistral-7B shape, random NF4 weights" },
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "base": "nf4 double-quant, blocksize 64",
            "activations": format!("{dtype:?}").to_lowercase(),
            "lora": "r=16 alpha=16 on q,k,v,o,gate,up,down (f32), AdamW (f32 state)",
            "gradient_checkpointing": true,
            "batch": batch,
            "seq": seq,
            "timed_steps": steps,
            "step_s_median": median,
            "step_s": times,
            "tokens_per_s": (batch * seq) as f64 / median,
            "losses": losses,
            "model_build_s": load_s,
            "trainable_params": trainable,
            "base_projection_bytes": base_bytes,
            "gpu_mem_idle_gib": idle.map(gib),
            "gpu_mem_after_load_gib": after_load.map(gib),
            "gpu_mem_peak_sampled_gib": if device.is_cpu() { None } else { Some(gib(peak)) },
        })
    );
    Ok(())
}
