//! Exporting a (merged) model for other runtimes: a Hugging Face directory with 16-bit
//! safetensors, or a llama.cpp-style GGUF (F16, Q8_0, Q4_K) with the tokenizer in its
//! metadata. Quantized projections are dequantized one layer at a time on the way out.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::config::Architecture;
use crate::model::gguf::{permute_rows, GgufFile};
use crate::model::Model;
use crate::peft::io::{replace_atomically, write_atomic};

/// Tokenizer and generation files copied next to an exported checkpoint when present
/// (transformers 5 keeps the chat template in `chat_template.jinja`, older versions in
/// `chat_template.json` or inside `tokenizer_config.json`).
pub const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Writes `model` as a Hugging Face model directory: `config.json`, `model.safetensors` in
/// `dtype` (F16 or BF16), and the tokenizer files found in `tokenizer_dir`.
pub fn save_hf_16bit(
    model: &Model,
    dir: impl AsRef<Path>,
    dtype: DType,
    tokenizer_dir: &Path,
) -> Result<()> {
    let dir = dir.as_ref();
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(Error::InvalidArgument(format!(
            "16-bit export needs F16 or BF16, not {dtype:?}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c = model.config();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, t: Tensor| -> Result<()> {
        tensors.insert(name, t.to_dtype(dtype)?);
        Ok(())
    };
    put(
        "model.embed_tokens.weight".into(),
        model.embed_tokens().clone(),
    )?;
    put(
        "model.norm.weight".into(),
        model.final_norm().weight().clone(),
    )?;
    for (i, layer) in model.layers().iter().enumerate() {
        put(
            format!("model.layers.{i}.input_layernorm.weight"),
            layer.input_layernorm.weight().clone(),
        )?;
        put(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.weight().clone(),
        )?;
    }
    for path in model.linear_paths() {
        if path == "lm_head" && c.tie_word_embeddings {
            continue;
        }
        put(
            format!("{path}.weight"),
            model.linear(&path)?.base().dense_weight()?,
        )?;
    }
    // Every file is written beside its final name and renamed into place: an interrupted
    // export never leaves a truncated model.safetensors that loads as a broken model.
    let config = hf_config_json(model, dtype);
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let config_path = dir.join("config.json");
    write_atomic(&config_path, text.as_bytes())?;
    // The safetensors writer creates its file owner-only (a temporary file renamed into place);
    // give the weights the permissions every other file of the export gets.
    let permissions = std::fs::metadata(&config_path)
        .map_err(|e| Error::io(&config_path, e))?
        .permissions();
    let file = dir.join("model.safetensors");
    replace_atomically(&file, |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
            .map_err(|e| Error::corrupt(tmp, e.to_string()))?;
        std::fs::set_permissions(tmp, permissions).map_err(|e| Error::io(tmp, e))
    })?;
    for name in TOKENIZER_FILES {
        let src = tokenizer_dir.join(name);
        if src.is_file() {
            replace_atomically(&dir.join(name), |tmp| {
                std::fs::copy(&src, tmp)
                    .map(drop)
                    .map_err(|e| Error::io(&src, e))
            })?;
        }
    }
    Ok(())
}

fn hf_config_json(model: &Model, dtype: DType) -> serde_json::Value {
    let c = model.config();
    let (model_type, class) = match c.architecture {
        Architecture::Mistral => ("mistral", "MistralForCausalLM"),
        _ => ("llama", "LlamaForCausalLM"),
    };
    serde_json::json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "sliding_window": c.sliding_window,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id.first(),
        "hidden_act": "silu",
        "torch_dtype": if dtype == DType::BF16 { "bfloat16" } else { "float16" },
    })
}

/// The tensor types a GGUF export can use, as llama.cpp names its file types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufExport {
    F16,
    Q8_0,
    /// Q4_K projections (Q5_0 where a row is not a multiple of 256, as llama.cpp falls back),
    /// Q6_K embeddings and head (Q8_0 when not a multiple of 256).
    Q4K,
}

impl GgufExport {
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufExport::F16 => 1,
            GgufExport::Q8_0 => 7,
            GgufExport::Q4K => 15,
        }
    }

    fn projection_type(self, cols: usize) -> GgmlDType {
        match self {
            GgufExport::F16 => GgmlDType::F16,
            GgufExport::Q8_0 => GgmlDType::Q8_0,
            GgufExport::Q4K if cols.is_multiple_of(256) => GgmlDType::Q4K,
            GgufExport::Q4K => GgmlDType::Q5_0,
        }
    }

    fn embedding_type(self, cols: usize) -> GgmlDType {
        match self {
            GgufExport::Q4K if cols.is_multiple_of(256) => GgmlDType::Q6K,
            GgufExport::Q4K => GgmlDType::Q8_0,
            other => other.projection_type(cols),
        }
    }
}

/// Writes `model` as a GGUF of the `llama` architecture, q/k rows in llama.cpp's order, with
/// the `tokenizer.*` metadata of `tokenizer_from` (the GGUF the model came from).
pub fn save_gguf(
    model: &Model,
    path: impl AsRef<Path>,
    kind: GgufExport,
    tokenizer_from: &GgufFile,
) -> Result<()> {
    let path = path.as_ref();
    let c = model.config();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("merged".into())),
        ("general.file_type".into(), Value::U32(kind.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            "llama.block_count".into(),
            Value::U32(c.num_hidden_layers as u32),
        ),
        (
            "llama.context_length".into(),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (
            "llama.embedding_length".into(),
            Value::U32(c.hidden_size as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(c.num_key_value_heads as u32),
        ),
        (
            "llama.attention.key_length".into(),
            Value::U32(c.head_dim as u32),
        ),
        (
            "llama.attention.value_length".into(),
            Value::U32(c.head_dim as u32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(c.head_dim as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), Value::U32(c.vocab_size as u32)),
    ];
    let mut tokenizer_keys: Vec<_> = tokenizer_from
        .content()
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    tokenizer_keys.sort_by(|a, b| a.0.cmp(b.0));
    if tokenizer_keys.is_empty() {
        return Err(Error::corrupt(
            tokenizer_from.path(),
            "no tokenizer.* metadata to copy",
        ));
    }
    metadata.extend(
        tokenizer_keys
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );

    let quantize = |t: &Tensor, dtype: GgmlDType| -> Result<QTensor> {
        Ok(QTensor::quantize(
            &t.to_dtype(DType::F32)?.contiguous()?,
            dtype,
        )?)
    };
    let mut tensors: Vec<(String, QTensor)> = vec![];
    let embed = model.embed_tokens();
    tensors.push((
        "token_embd.weight".into(),
        quantize(embed, kind.embedding_type(c.hidden_size))?,
    ));
    tensors.push((
        "output_norm.weight".into(),
        quantize(model.final_norm().weight(), GgmlDType::F32)?,
    ));
    if !c.tie_word_embeddings {
        let head = model.linear("lm_head")?.base().dense_weight()?;
        tensors.push((
            "output.weight".into(),
            quantize(&head, kind.embedding_type(c.hidden_size))?,
        ));
    }
    let names = [
        ("self_attn.q_proj", "attn_q", Some(c.num_attention_heads)),
        ("self_attn.k_proj", "attn_k", Some(c.num_key_value_heads)),
        ("self_attn.v_proj", "attn_v", None),
        ("self_attn.o_proj", "attn_output", None),
        ("mlp.gate_proj", "ffn_gate", None),
        ("mlp.up_proj", "ffn_up", None),
        ("mlp.down_proj", "ffn_down", None),
    ];
    for (i, layer) in model.layers().iter().enumerate() {
        tensors.push((
            format!("blk.{i}.attn_norm.weight"),
            quantize(layer.input_layernorm.weight(), GgmlDType::F32)?,
        ));
        tensors.push((
            format!("blk.{i}.ffn_norm.weight"),
            quantize(layer.post_attention_layernorm.weight(), GgmlDType::F32)?,
        ));
        for (hf, gg, heads) in names {
            let w = model
                .linear(&format!("model.layers.{i}.{hf}"))?
                .base()
                .dense_weight()?;
            let w = match heads {
                Some(n) => permute_rows(&w.to_dtype(DType::F32)?, n)?,
                None => w,
            };
            let cols = w.dim(1)?;
            tensors.push((
                format!("blk.{i}.{gg}.weight"),
                quantize(&w, kind.projection_type(cols))?,
            ));
        }
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    replace_atomically(path, |tmp| {
        let mut file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        gguf_file::write(&mut file, &md, &ts)
            .map_err(|e| Error::corrupt(path, format!("writing GGUF: {e}")))
    })
}
