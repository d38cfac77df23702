//! Resident memory of a synthetic Mistral-shaped model of about 1.1B parameters loaded with
//! `load_in_4bit` (NF4, double quantization), streamed layer by layer from a random source:
//! at most one projection is ever dense. Prints one JSON line.
//!
//! ```text
//! cargo run --release -p peft_prelude --example bench_qlora_memory -- [LAYERS]
//! ```

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use peft_prelude::model::config::{Architecture, ModelConfig};
use peft_prelude::model::weights::{load_model_weights_quantized, WeightSource};
use peft_prelude::model::{Forward, Model};
use peft_prelude::quant::Quantization;

/// Random weights by Hugging Face name, generated when asked for (nothing kept).
struct RandomSource {
    config: ModelConfig,
}

impl RandomSource {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let c = &self.config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let last = name.trim_end_matches(".weight").rsplit('.').next()?;
        Some(match last {
            "embed_tokens" | "lm_head" => vec![c.vocab_size, h],
            "q_proj" => vec![q, h],
            "k_proj" | "v_proj" => vec![kv, h],
            "o_proj" => vec![h, q],
            "gate_proj" | "up_proj" => vec![i, h],
            "down_proj" => vec![h, i],
            "norm" | "input_layernorm" | "post_attention_layernorm" => vec![h],
            _ => return None,
        })
    }
}

impl WeightSource for RandomSource {
    fn file_of(&self, _name: &str) -> PathBuf {
        PathBuf::from("<random>")
    }

    fn contains(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }

    fn shape(&self, name: &str) -> peft_prelude::Result<Vec<usize>> {
        Ok(self.shape_of(name).unwrap_or_default())
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> peft_prelude::Result<Tensor> {
        let shape = self.shape_of(name).unwrap_or_default();
        Ok(Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?)
    }
}

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let layers: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(18);
    // Mistral's shape at a smaller width: GQA 16/4 heads of 128, SwiGLU 3.5× wide, vocab 32000.
    let config = ModelConfig {
        architecture: Architecture::Mistral,
        vocab_size: 32000,
        hidden_size: 2048,
        intermediate_size: 7168,
        num_hidden_layers: layers,
        num_attention_heads: 16,
        num_key_value_heads: 4,
        head_dim: 128,
        max_position_embeddings: 4096,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        sliding_window: Some(4096),
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: vec![2],
        variant: Default::default(),
        hf_config: None,
    };
    let rss_before = status_kb("VmRSS:");
    let source = RandomSource {
        config: config.clone(),
    };
    let t = std::time::Instant::now();
    let weights = load_model_weights_quantized(
        &config,
        &source,
        DType::F16,
        &Device::Cpu,
        Quantization::QLORA,
    )?;
    let model = Model::new(config.clone(), weights)?;
    let load_s = t.elapsed().as_secs_f64();
    let rss = status_kb("VmRSS:");
    let peak = status_kb("VmHWM:");

    let mut linear_params = 0usize;
    let mut linear_bytes = 0usize;
    for p in model.linear_paths().iter().filter(|p| *p != "lm_head") {
        let base = model.linear(p)?.base();
        linear_params += base.num_params();
        linear_bytes += base.weight_bytes();
    }
    let head = model.linear("lm_head")?.base();
    let sixteen_bit = (model.embed_tokens().elem_count() + head.num_params()) * 2;
    let resident = (rss - rss_before) as f64 * 1024.0;
    // One short forward proves the model runs.
    let ids = Tensor::new(&[[1u32, 415, 2936, 9060]], &Device::Cpu)?;
    let t = std::time::Instant::now();
    let logits = model.forward_with(Forward::ids(&ids))?;
    let forward_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "layers": layers,
            "parameters": model.num_parameters(),
            "linear_parameters": linear_params,
            "linear_bytes_per_parameter": linear_bytes as f64 / linear_params as f64,
            "embedding_and_head_bytes_16bit": sixteen_bit,
            "resident_bytes_after_load": resident,
            "resident_bytes_per_linear_parameter_excluding_16bit": (resident - sixteen_bit as f64) / linear_params as f64,
            "budget_bytes": 0.6 * linear_params as f64 + sixteen_bit as f64,
            "peak_rss_bytes_during_load": peak as f64 * 1024.0,
            "process_rss_before_load_bytes": rss_before as f64 * 1024.0,
            "load_seconds": load_s,
            "forward_4_tokens_seconds": forward_s,
            "logits_shape": logits.dims(),
        })
    );
    Ok(())
}
