//! Exporting a model as a llama.cpp GGUF (F16, Q8_0, Q4_K_M) of its family's architecture
//! (`llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3`), tensors named and transformed as
//! llama.cpp's converter does (the inverse of [`crate::model::gguf::tensor_names`]), with the
//! tokenizer in the metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::export::ExportSource;
use crate::error::{Error, Result};
use crate::model::config::Architecture;
use crate::model::gguf::{permute_rows, tensor_names, Restore};
use crate::model::rope_scaling::RopeScaling;
use crate::model::variant::LayerKind;
use crate::model::{Model, ModelConfig};
use crate::peft::io::replace_atomically;
use crate::tokenizer::Tokenizer;

/// The tensor types of a GGUF export, as llama.cpp names its file types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufExport {
    F16,
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K projections, Q6_K for the value and down projections of
    /// the layers `use_more_bits` picks and for the head (or a tied embedding); a row that is
    /// not a multiple of 256 falls back as llama.cpp does (Q4_K → Q5_0, Q6_K → Q8_0).
    Q4KM,
}

impl GgufExport {
    /// Unsloth's `quantization_method` names (`"f16"`, `"q8_0"`, `"q4_k_m"`, and its aliases
    /// `"not_quantized"`, `"fast_quantized"`, `"quantized"`), case-insensitive.
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f16" | "not_quantized" => Ok(GgufExport::F16),
            "q8_0" | "fast_quantized" => Ok(GgufExport::Q8_0),
            "q4_k_m" | "quantized" => Ok(GgufExport::Q4KM),
            other => Err(Error::InvalidArgument(format!(
                "GGUF quantization `{other}` (supported: f16, q8_0, q4_k_m; or Unsloth's not_quantized, fast_quantized, quantized)"
            ))),
        }
    }

    /// llama.cpp's name of the file type (`Q4_K_M`), as used in file names.
    pub fn name(self) -> &'static str {
        match self {
            GgufExport::F16 => "F16",
            GgufExport::Q8_0 => "Q8_0",
            GgufExport::Q4KM => "Q4_K_M",
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufExport::F16 => 1,
            GgufExport::Q8_0 => 7,
            GgufExport::Q4KM => 15,
        }
    }

    /// The type of a matrix of row length `cols`: `role` says which rule of the mix applies.
    fn tensor_type(self, role: Role, cols: usize) -> GgmlDType {
        let wanted = match (self, role) {
            (GgufExport::F16, _) => return GgmlDType::F16,
            (GgufExport::Q8_0, _) => return GgmlDType::Q8_0,
            (GgufExport::Q4KM, Role::Head | Role::MoreBits) => GgmlDType::Q6K,
            (GgufExport::Q4KM, Role::Plain) => GgmlDType::Q4K,
        };
        if cols.is_multiple_of(256) {
            wanted
        } else if wanted == GgmlDType::Q6K {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q5_0
        }
    }
}

/// Which of llama.cpp's Q4_K_M rules a tensor falls under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The output head, or the embedding when it is also the head.
    Head,
    /// `attn_v` (or the fused `attn_qkv`) / `ffn_down` of a layer `use_more_bits` picks.
    MoreBits,
    Plain,
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`: the first and last eighth of the layers and
/// every third in between get more bits for their value and down projections.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// llama.cpp's architecture name of a family.
fn gguf_architecture(a: Architecture) -> &'static str {
    match a {
        Architecture::Mistral | Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        Architecture::Gemma2 => "gemma2",
        Architecture::Gemma3 => "gemma3",
        Architecture::Phi3 => "phi3",
    }
}

/// Writes `model` as a GGUF of its family's llama.cpp architecture, with the tokenizer's
/// `tokenizer.*` metadata ([`Tokenizer::gguf_metadata`]).
pub fn save_gguf(
    model: &Model,
    path: impl AsRef<Path>,
    kind: GgufExport,
    tokenizer: &Tokenizer,
) -> Result<()> {
    write_gguf(&ExportSource::of(model), path, kind, tokenizer)
}

/// [`save_gguf`] from any [`ExportSource`].
pub fn write_gguf(
    source: &ExportSource<'_>,
    path: impl AsRef<Path>,
    kind: GgufExport,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let path = path.as_ref();
    let model = source.model();
    let c = model.config();
    let arch = gguf_architecture(c.architecture);
    let (mut metadata, extra_tensors) = architecture_metadata(c, arch, path)?;
    metadata.splice(
        0..0,
        [
            ("general.architecture".into(), Value::String(arch.into())),
            ("general.name".into(), Value::String("merged".into())),
            ("general.file_type".into(), Value::U32(kind.file_type())),
            ("general.quantization_version".into(), Value::U32(2)),
        ],
    );
    metadata.extend(tokenizer.gguf_metadata()?);

    // Every tensor of the checkpoint in Hugging Face's naming and convention.
    let mut hf: HashMap<String, Tensor> = source.non_projection_tensors()?.into_iter().collect();
    for p in source.projection_paths() {
        hf.insert(format!("{p}.weight"), source.linear_weight(&p)?);
    }
    let layers = c.num_hidden_layers;
    let mut tensors: Vec<(String, QTensor)> = vec![];
    for name in tensor_names(c) {
        let Some(t) = hf.get(&name.hf) else {
            continue;
        };
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let t = match name.restore {
            Restore::Unpermute(heads) => permute_rows(&t, heads)?,
            Restore::SubtractOne => (t + 1.0)?,
            Restore::Nothing => t,
        };
        let ty = if t.rank() == 1 {
            GgmlDType::F32
        } else {
            let layer = name.layer.unwrap_or(0);
            let role = match name.gguf.as_str() {
                "output.weight" => Role::Head,
                "token_embd.weight" if c.tie_word_embeddings => Role::Head,
                g if [".attn_v.weight", ".attn_qkv.weight", ".ffn_down.weight"]
                    .iter()
                    .any(|s| g.ends_with(s))
                    && use_more_bits(layer, layers) =>
                {
                    Role::MoreBits
                }
                _ => Role::Plain,
            };
            kind.tensor_type(role, t.dim(1)?)
        };
        tensors.push((name.gguf, QTensor::quantize(&t.contiguous()?, ty)?));
    }
    for (name, values) in extra_tensors {
        let n = values.len();
        let t = Tensor::from_vec(values, n, &Device::Cpu)?;
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    replace_atomically(path, |tmp| {
        let mut file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        gguf_file::write(&mut file, &md, &ts).map_err(|e| {
            Error::corrupt(
                path,
                format!("writing GGUF: {}", crate::error::candle_message(&e)),
            )
        })
    })
}

type Metadata = Vec<(String, Value)>;
/// Small F32 tensors written besides the checkpoint's (RoPE factors), by GGUF name.
type ExtraTensors = Vec<(String, Vec<f32>)>;

/// The `{arch}.*` keys, and the RoPE factor tensors (name, values) some architectures carry.
fn architecture_metadata(
    c: &ModelConfig,
    arch: &str,
    path: &Path,
) -> Result<(Metadata, ExtraTensors)> {
    let v = &c.variant;
    let u32_of = |x: usize| Value::U32(x as u32);
    let mut keys: Vec<(&str, Value)> = vec![
        ("block_count", u32_of(c.num_hidden_layers)),
        ("context_length", u32_of(c.max_position_embeddings)),
        ("embedding_length", u32_of(c.hidden_size)),
        ("feed_forward_length", u32_of(c.intermediate_size)),
        ("attention.head_count", u32_of(c.num_attention_heads)),
        ("attention.head_count_kv", u32_of(c.num_key_value_heads)),
        ("attention.key_length", u32_of(c.head_dim)),
        ("attention.value_length", u32_of(c.head_dim)),
        ("rope.dimension_count", u32_of(c.head_dim)),
        ("rope.freq_base", Value::F32(c.rope_theta as f32)),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("vocab_size", u32_of(c.vocab_size)),
    ];
    let mut tensors = vec![];
    let refuse = |what: String| Err(Error::unsupported(path, what));
    match &v.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            keys.push(("rope.scaling.type", Value::String("linear".into())));
            keys.push(("rope.scaling.factor", Value::F32(*factor as f32)));
        }
        // llama.cpp's converter turns Llama 3's parameters into per-frequency divisors.
        scaling @ (RopeScaling::Llama3 { .. } | RopeScaling::Factors { .. }) => {
            let (plain, _) = RopeScaling::Default.inv_freq(c.head_dim, c.rope_theta, 1);
            let (scaled, _) = scaling.inv_freq(c.head_dim, c.rope_theta, 1);
            let factors = plain.iter().zip(&scaled).map(|(p, s)| (p / s) as f32);
            tensors.push(("rope_freqs.weight".to_string(), factors.collect()));
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_positions,
            attention_factor,
        } => {
            let f32s = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<_>>();
            tensors.push(("rope_factors_long.weight".into(), f32s(long_factor)));
            tensors.push(("rope_factors_short.weight".into(), f32s(short_factor)));
            keys.push((
                "rope.scaling.original_context_length",
                u32_of(*original_max_positions),
            ));
            keys.push(("rope.scaling.attn_factor", Value::F32(*attention_factor as f32)));
        }
        other => {
            return refuse(format!(
                "GGUF export of RoPE scaling {other:?} (llama.cpp reads none, linear, Llama 3's factors and longrope from a GGUF)"
            ))
        }
    }
    let gemma = matches!(c.architecture, Architecture::Gemma2 | Architecture::Gemma3);
    if let Some(window) = c.sliding_window {
        if gemma || c.architecture == Architecture::Phi3 {
            keys.push(("attention.sliding_window", u32_of(window)));
        } else if window < c.max_position_embeddings {
            eprintln!(
                "Warning: GGUF's {arch} architecture has no sliding window (llama.cpp attends to \
                 every earlier token): this model's window of {window} tokens is dropped, which \
                 changes nothing for sequences of up to {window} tokens."
            );
        }
    }
    if gemma {
        if let Some(cap) = v.attn_logit_softcapping {
            keys.push(("attn_logit_softcapping", Value::F32(cap as f32)));
        }
        if let Some(cap) = v.final_logit_softcapping {
            keys.push(("final_logit_softcapping", Value::F32(cap as f32)));
        }
        if let Some(period) = sliding_period(c) {
            keys.push(("attention.sliding_window_pattern", u32_of(period)));
        } else if c.sliding_window.is_some() {
            eprintln!(
                "Warning: llama.cpp describes which layers slide by one period; this model's \
                 layer pattern has none, so llama.cpp will slide in its default layers."
            );
        }
        if let Some((theta, _)) = &v.local_rope {
            keys.push(("rope.freq_base_swa", Value::F32(*theta as f32)));
        }
        // llama.cpp derives the attention scale from the size (GGUF has no key for it).
        let big = matches!(
            (c.architecture, c.num_hidden_layers),
            (Architecture::Gemma2, 46) | (Architecture::Gemma3, 62)
        );
        let llama_cpp_scalar = match big {
            true => (c.hidden_size / c.num_attention_heads) as f64,
            false => c.head_dim as f64,
        };
        if let Some(s) = v.query_pre_attn_scalar.filter(|s| *s != llama_cpp_scalar) {
            eprintln!(
                "Warning: this model scales attention scores by query_pre_attn_scalar {s}^-1/2; \
                 llama.cpp uses {llama_cpp_scalar}^-1/2 for a GGUF of this size and has no key \
                 to say otherwise, so it will answer differently."
            );
        }
    }
    let metadata = keys
        .into_iter()
        .map(|(k, v)| (format!("{arch}.{k}"), v))
        .collect();
    Ok((metadata, tensors))
}

/// The period `n` for which llama.cpp's rule (layer `i` slides when `i % n < n - 1`) gives the
/// model's layer kinds; `None` when no period does.
fn sliding_period(c: &ModelConfig) -> Option<usize> {
    let kinds: Vec<LayerKind> = (0..c.num_hidden_layers).map(|i| c.layer_kind(i)).collect();
    (1..=kinds.len() + 1).find(|&n| {
        kinds.iter().enumerate().all(|(i, k)| {
            let slides = i % n < n - 1;
            slides == (*k == LayerKind::Sliding)
        })
    })
}
/// `dir/model.{Q}.gguf`, the file [`write_gguf`] writes for a directory export.
pub fn gguf_file_in(dir: impl AsRef<Path>, kind: GgufExport) -> PathBuf {
    let dir = dir.as_ref();
    dir.join(format!("model.{}.gguf", kind.name()))
}
