//! A [`ModelConfig`] from GGUF metadata, for the architectures llama.cpp's
//! `convert_hf_to_gguf.py` writes for our families: `llama` (Llama and Mistral), `qwen2`,
//! `qwen3`, `gemma2`, `gemma3`, `phi3`. Where GGUF leaves a setting out, llama.cpp's own
//! defaults apply (Gemma's sliding-window period, its attention scale, soft-caps), so a file
//! answers here as it does in llama.cpp.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};

use super::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::model::rope_scaling::RopeScaling;
use crate::model::variant::{Activation, AttentionBias, LayerKind, Variant};

/// Reads a small F32 tensor (RoPE factors) of the file by name; `None` when absent.
pub type ReadVector<'a> = &'a dyn Fn(&str) -> Result<Option<Vec<f64>>>;

/// The GGUF architectures this decoder reads.
const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3";

/// Typed access to `{arch}.*` metadata, errors naming the file and key.
struct Meta<'a> {
    content: &'a gguf_file::Content,
    arch: &'a str,
    path: &'a Path,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn raw(&self, k: &str) -> Option<&Value> {
        self.content.metadata.get(&self.key(k))
    }

    fn bad(&self, k: &str, e: impl std::fmt::Display) -> Error {
        Error::corrupt(self.path, format!("metadata {}: {e}", self.key(k)))
    }

    fn u32(&self, k: &str) -> Result<Option<usize>> {
        match self.raw(k) {
            None => Ok(None),
            Some(v) => v
                .to_u32()
                .or_else(|_| v.to_u64().map(|x| x as u32))
                .map(|x| Some(x as usize))
                .map_err(|e| self.bad(k, e)),
        }
    }

    fn require(&self, k: &str) -> Result<usize> {
        self.u32(k)?
            .ok_or_else(|| Error::corrupt(self.path, format!("missing metadata {}", self.key(k))))
    }

    fn f32(&self, k: &str) -> Result<Option<f64>> {
        match self.raw(k) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(|x| Some(x as f64))
                .map_err(|e| self.bad(k, e)),
        }
    }

    fn string(&self, k: &str) -> Option<&str> {
        self.raw(k)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }
}

pub(super) fn from_gguf(
    content: &gguf_file::Content,
    path: &Path,
    read_vector: ReadVector<'_>,
) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| Error::corrupt(path, "GGUF has no general.architecture"))?;
    let architecture = match arch.as_str() {
        "llama" | "mistral" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "gemma2" => Architecture::Gemma2,
        "gemma3" => Architecture::Gemma3,
        "phi3" => Architecture::Phi3,
        other => {
            return Err(Error::unsupported(
                path,
                format!("GGUF architecture `{other}` (supported: {SUPPORTED})"),
            ))
        }
    };
    let meta = Meta {
        content,
        arch,
        path,
    };
    let hidden_size = meta.require("embedding_length")?;
    let heads = meta.require("attention.head_count")?;
    let kv_heads = meta.u32("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = match meta.u32("attention.key_length")? {
        Some(d) => d,
        None => hidden_size / heads.max(1),
    };
    if let Some(rotated) = meta.u32("rope.dimension_count")? {
        if rotated != head_dim {
            return Err(Error::unsupported(
                path,
                format!(
                    "{} {rotated} with heads of {head_dim} (partial rotation is not implemented)",
                    meta.key("rope.dimension_count")
                ),
            ));
        }
    }
    let vocab_size = match meta.u32("vocab_size")? {
        Some(v) => v,
        None => match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => content
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or_else(|| Error::corrupt(path, "cannot determine the vocabulary size"))?,
        },
    };
    let layers = meta.require("block_count")?;
    // Checked here, before the per-layer pattern is built from it (validated() checks the rest).
    if layers > 1 << 12 {
        return Err(meta.bad(
            "block_count",
            format!("{layers} layers, above the limit of 4096"),
        ));
    }
    let context = meta.u32("context_length")?.unwrap_or(4096);
    let rope_scaling = rope_scaling(&meta, context, read_vector)?;
    let window = meta.u32("attention.sliding_window")?.filter(|w| *w > 0);
    let mut variant = Variant {
        rope_scaling,
        ..Variant::default()
    };
    let mut sliding_window = None;
    match architecture {
        Architecture::Qwen2 => variant.attention_bias = AttentionBias::Qkv,
        Architecture::Qwen3 => variant.qk_norm = true,
        Architecture::Phi3 => {
            variant.fused_projections = true;
            // Phi-3 slides in every layer when it has a window.
            sliding_window = window;
        }
        Architecture::Gemma2 | Architecture::Gemma3 => {
            let gemma3 = architecture == Architecture::Gemma3;
            variant.norm_unit_offset = true;
            variant.scale_embeddings = true;
            variant.sandwich_norms = true;
            variant.activation = Activation::GeluTanh;
            variant.qk_norm = gemma3;
            // llama.cpp's defaults: Gemma 2 caps at 50 / 30 unless told; Gemma 3 caps the
            // logits only when the key is there, and never the attention.
            variant.attn_logit_softcapping = match gemma3 {
                true => None,
                false => Some(meta.f32("attn_logit_softcapping")?.unwrap_or(50.0)),
            };
            variant.final_logit_softcapping = match (gemma3, meta.f32("final_logit_softcapping")?) {
                (_, Some(c)) if c > 0.0 => Some(c),
                (true, _) => None,
                (false, _) => Some(30.0),
            };
            // GGUF has no query_pre_attn_scalar: llama.cpp scales by the head size, except
            // for the 27B models (46 and 62 layers), whose scalar is hidden / heads.
            let big = matches!((gemma3, layers), (false, 46) | (true, 62));
            variant.query_pre_attn_scalar = Some(match big {
                true => (hidden_size / heads.max(1)) as f64,
                false => head_dim as f64,
            });
            // Gemma 2 defaults to a window of 4096; Gemma 3 slides only with one.
            let window = match gemma3 {
                true => window,
                false => Some(window.unwrap_or(4096)),
            };
            if let Some(w) = window {
                sliding_window = Some(w);
                variant.layer_types = layer_pattern(&meta, layers, if gemma3 { 6 } else { 2 })?;
            }
            if gemma3 {
                let base = meta.f32("rope.freq_base_swa")?.unwrap_or(10_000.0);
                variant.local_rope = Some((base, RopeScaling::Default));
            }
        }
        Architecture::Llama | Architecture::Mistral => {}
    }
    let token_id = |k: &str| -> Option<u32> { md.get(k).and_then(|v| v.to_u32().ok()) };
    ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: meta.require("feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: context,
        rope_theta: meta.f32("rope.freq_base")?.unwrap_or(10_000.0),
        rms_norm_eps: meta
            .f32("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-5),
        sliding_window,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect(),
        variant,
        hf_config: None,
    }
    .validated()
    .map_err(|e| match e {
        Error::Config(what) => Error::corrupt(path, what),
        other => other,
    })
}

/// Which layers slide: `attention.sliding_window_pattern` as a period or a per-layer array,
/// else the family's period (llama.cpp's rule: layer `i` slides when `i % n < n - 1`).
fn layer_pattern(meta: &Meta<'_>, layers: usize, default_period: usize) -> Result<Vec<LayerKind>> {
    let key = "attention.sliding_window_pattern";
    let kinds: Vec<LayerKind> = match meta.raw(key) {
        Some(Value::Array(flags)) => {
            if flags.len() != layers {
                return Err(meta.bad(key, format!("{} entries for {layers} layers", flags.len())));
            }
            flags
                .iter()
                .map(|f| match f.to_bool() {
                    Ok(true) => Ok(LayerKind::Sliding),
                    Ok(false) => Ok(LayerKind::Full),
                    Err(e) => Err(meta.bad(key, e)),
                })
                .collect::<Result<_>>()?
        }
        _ => {
            let n = meta.u32(key)?.unwrap_or(default_period);
            (0..layers)
                .map(|i| match n == 0 || i % n < n - 1 {
                    true => LayerKind::Sliding,
                    false => LayerKind::Full,
                })
                .collect()
        }
    };
    // Every layer alike is the uniform form the KV cache can trim.
    Ok(match kinds.iter().all(|k| *k == LayerKind::Sliding) {
        true => vec![],
        false => kinds,
    })
}

/// RoPE scaling from GGUF: `rope.scaling.type` linear (factor), Llama 3's frequency factors
/// (the `rope_freqs.weight` tensor), Phi-3's long/short factors (`rope_factors_long/short`).
fn rope_scaling(
    meta: &Meta<'_>,
    context: usize,
    read_vector: ReadVector<'_>,
) -> Result<RopeScaling> {
    let kind = meta.string("rope.scaling.type").unwrap_or("none");
    let factor = meta
        .f32("rope.scaling.factor")?
        .filter(|f| *f != 0.0 && *f != 1.0);
    if let Some(factors) = read_vector("rope_freqs.weight")? {
        return Ok(RopeScaling::Factors { factors });
    }
    if let (Some(long), Some(short)) = (
        read_vector("rope_factors_long.weight")?,
        read_vector("rope_factors_short.weight")?,
    ) {
        let original = meta
            .u32("rope.scaling.original_context_length")?
            .unwrap_or(context);
        let attention_factor = meta.f32("rope.scaling.attn_factor")?.unwrap_or(1.0);
        return Ok(RopeScaling::LongRope {
            short_factor: short,
            long_factor: long,
            original_max_positions: original,
            attention_factor,
        });
    }
    match (kind, factor) {
        ("none", None) | ("linear", None) => Ok(RopeScaling::Default),
        ("linear" | "none", Some(factor)) => Ok(RopeScaling::Linear { factor }),
        (other, _) => Err(Error::unsupported(
            meta.path,
            format!(
                "{} `{other}` (GGUF RoPE scaling read: none, linear, Llama 3's rope_freqs, Phi-3's long/short factors)",
                meta.key("rope.scaling.type")
            ),
        )),
    }
}
