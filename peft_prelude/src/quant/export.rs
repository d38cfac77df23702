//! Exporting a model for other runtimes: a Hugging Face directory with 16-bit safetensors, a
//! bitsandbytes 4-bit (NF4) directory, or a llama.cpp GGUF (F16, Q8_0, Q4_K_M) with the
//! tokenizer in its metadata. Every export is self-contained: the tokenizer is written from the
//! [`Tokenizer`] in hand, whatever the model was loaded from.
//!
//! What is written comes from an [`ExportSource`]: a model's own weights, or (through
//! [`PeftModel::save_pretrained_merged`](crate::peft::PeftModel::save_pretrained_merged)) its
//! weights with an adapter merged in full precision, one projection at a time, without
//! touching the model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::nf4_weight::Nf4Weight;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::peft::io::{replace_atomically, write_atomic};

pub use super::gguf_export::{gguf_file_in, save_gguf, write_gguf, GgufExport};
use crate::quant::Absmax;
use crate::tokenizer::Tokenizer;

/// A projection's dense weight `[out, in]`, by Hugging Face module path.
type LinearWeights<'a> = Box<dyn Fn(&str) -> Result<Tensor> + 'a>;

/// The tensors an export writes: the configuration, norms and (by default) weights of a
/// model, with the projections and the embedding possibly replaced (an adapter merged in).
pub struct ExportSource<'a> {
    model: &'a Model,
    linear: LinearWeights<'a>,
    embed_tokens: Tensor,
}

impl<'a> ExportSource<'a> {
    /// The model's own weights (quantized ones dequantized one projection at a time).
    pub fn of(model: &'a Model) -> Self {
        ExportSource {
            model,
            linear: Box::new(move |path| model.linear(path)?.base().dense_weight()),
            embed_tokens: model.embed_tokens().clone(),
        }
    }

    /// `model`'s configuration and norms with projections from `linear` and the embedding
    /// table `embed_tokens`.
    pub fn with_weights(
        model: &'a Model,
        linear: impl Fn(&str) -> Result<Tensor> + 'a,
        embed_tokens: Tensor,
    ) -> Self {
        ExportSource {
            model,
            linear: Box::new(linear),
            embed_tokens,
        }
    }

    /// The dense weight `[out, in]` written for the projection at `path`.
    pub fn linear_weight(&self, path: &str) -> Result<Tensor> {
        (self.linear)(path)
    }

    /// The model whose configuration and norms are written.
    pub fn model(&self) -> &'a Model {
        self.model
    }

    /// The token embedding table written.
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Every tensor of a Hugging Face checkpoint but the projections' weights: embedding,
    /// norms (Gemma's as offsets from one, as its checkpoints store them), projection biases.
    pub(crate) fn non_projection_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let model = self.model;
        let offset = model.config().variant.norm_unit_offset;
        let norm = |n: &crate::model::norm::RmsNorm| -> Result<Tensor> {
            Ok(if offset {
                (n.weight() - 1.0)?
            } else {
                n.weight().clone()
            })
        };
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                self.embed_tokens.clone(),
            ),
            ("model.norm.weight".to_string(), norm(model.final_norm())?),
        ];
        for (i, layer) in model.layers().iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &layer.self_attn;
            for (name, n) in [
                ("input_layernorm", Some(&layer.input_layernorm)),
                (
                    "post_attention_layernorm",
                    Some(&layer.post_attention_layernorm),
                ),
                (
                    "pre_feedforward_layernorm",
                    layer.pre_feedforward_layernorm.as_ref(),
                ),
                (
                    "post_feedforward_layernorm",
                    layer.post_feedforward_layernorm.as_ref(),
                ),
                ("self_attn.q_norm", a.q_norm.as_ref()),
                ("self_attn.k_norm", a.k_norm.as_ref()),
            ] {
                if let Some(n) = n {
                    out.push((format!("{p}.{name}.weight"), norm(n)?));
                }
            }
        }
        for path in model.linear_paths() {
            if let Some(bias) = model.linear(&path)?.base().bias() {
                out.push((format!("{path}.bias"), bias.clone()));
            }
        }
        Ok(out)
    }

    /// The projection paths a checkpoint stores (a tied head is the embedding).
    pub(crate) fn projection_paths(&self) -> Vec<String> {
        let tied = self.model.config().tie_word_embeddings;
        self.model
            .linear_paths()
            .into_iter()
            .filter(|p| p != "lm_head" || !tied)
            .collect()
    }
}

/// Writes `model` as a Hugging Face model directory: `config.json`, `generation_config.json`,
/// `model.safetensors` in `dtype` (F16 or BF16), and the tokenizer
/// ([`Tokenizer::save_pretrained`]).
pub fn save_hf_16bit(
    model: &Model,
    dir: impl AsRef<Path>,
    dtype: DType,
    tokenizer: &Tokenizer,
) -> Result<()> {
    write_hf_16bit(&ExportSource::of(model), dir, dtype, tokenizer)
}

/// [`save_hf_16bit`] from any [`ExportSource`].
pub fn write_hf_16bit(
    source: &ExportSource<'_>,
    dir: impl AsRef<Path>,
    dtype: DType,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let dir = dir.as_ref();
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(Error::InvalidArgument(format!(
            "16-bit export needs F16 or BF16, not {dtype:?}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in source.non_projection_tensors()? {
        tensors.insert(name, t.to_dtype(dtype)?);
    }
    for path in source.projection_paths() {
        tensors.insert(
            format!("{path}.weight"),
            source.linear_weight(&path)?.to_dtype(dtype)?,
        );
    }
    let config = hf_config_json(source.model, dtype, None);
    write_checkpoint(dir, &config, &tensors, source.model, tokenizer)
}

/// Writes a bitsandbytes 4-bit checkpoint: every decoder projection quantized to NF4 with
/// double quantization (as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
/// bnb_4bit_use_double_quant=True)` stores it), embeddings, norms and head in the model's
/// dtype. transformers loads it with bitsandbytes; [`crate::model::Pretrained`] loads it too.
pub fn write_bnb_4bit(
    source: &ExportSource<'_>,
    dir: impl AsRef<Path>,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dtype = source.model.dtype();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in source.non_projection_tensors()? {
        tensors.insert(name, t.to_dtype(dtype)?.to_device(&Device::Cpu)?);
    }
    for path in source.projection_paths() {
        let w = source.linear_weight(&path)?;
        if path == "lm_head" {
            // bitsandbytes leaves the head in full precision.
            tensors.insert(
                format!("{path}.weight"),
                w.to_dtype(dtype)?.to_device(&Device::Cpu)?,
            );
            continue;
        }
        let nf4 = Nf4Weight::quantize(&w.to_device(&Device::Cpu)?, true)?;
        bnb_tensors(&format!("{path}.weight"), &nf4, dtype, &mut tensors)?;
    }
    let config = hf_config_json(
        source.model,
        dtype,
        Some(serde_json::json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": true,
            "bnb_4bit_compute_dtype": torch_dtype(dtype),
            "bnb_4bit_quant_storage": "uint8",
        })),
    );
    write_checkpoint(dir, &config, &tensors, source.model, tokenizer)
}

/// bitsandbytes' serialized layout of one NF4 weight `name` (see [`super::bnb`]).
fn bnb_tensors(
    name: &str,
    w: &Nf4Weight,
    dtype: DType,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let m = w.matrix();
    let cpu = Device::Cpu;
    let packed = m.packed().to_device(&cpu)?;
    let n = packed.elem_count();
    out.insert(name.to_string(), packed.reshape((n, 1))?);
    out.insert(
        format!("{name}.quant_map"),
        Tensor::from_slice(m.code(), 16, &cpu)?,
    );
    let mut state = serde_json::json!({
        "quant_type": "nf4",
        "blocksize": m.blocksize(),
        "dtype": torch_dtype(dtype).trim_start_matches("torch."),
        "shape": [m.rows(), m.cols()],
    });
    match m.absmax() {
        Absmax::Plain(a) => {
            out.insert(
                format!("{name}.absmax"),
                Tensor::from_slice(a, a.len(), &cpu)?,
            );
        }
        Absmax::Nested {
            codes,
            code_map,
            nested_absmax,
            nested_blocksize,
            offset,
        } => {
            out.insert(
                format!("{name}.absmax"),
                Tensor::from_slice(codes, codes.len(), &cpu)?,
            );
            out.insert(
                format!("{name}.nested_absmax"),
                Tensor::from_slice(nested_absmax, nested_absmax.len(), &cpu)?,
            );
            out.insert(
                format!("{name}.nested_quant_map"),
                Tensor::from_slice(code_map, code_map.len(), &cpu)?,
            );
            state["nested_blocksize"] = (*nested_blocksize).into();
            state["nested_offset"] = (*offset as f64).into();
        }
    }
    let bytes = serde_json::to_vec(&state).expect("JSON values serialise");
    let len = bytes.len();
    out.insert(
        format!("{name}.quant_state.bitsandbytes__nf4"),
        Tensor::from_vec(bytes, len, &cpu)?,
    );
    Ok(())
}

/// `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer, each
/// written beside its final name and renamed into place: an interrupted export never leaves a
/// truncated file that loads as a broken model.
fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
    model: &Model,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON serialises");
    let config_path = dir.join("config.json");
    write_atomic(&config_path, &pretty(config))?;
    let c = model.config();
    let generation = serde_json::json!({
        "bos_token_id": c.bos_token_id,
        "eos_token_id": match c.eos_token_id.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        },
        "do_sample": false,
    });
    write_atomic(dir.join("generation_config.json"), &pretty(&generation))?;
    // The safetensors writer creates its file owner-only (a temporary file renamed into place);
    // give the weights the permissions every other file of the export gets.
    let permissions = std::fs::metadata(&config_path)
        .map_err(|e| Error::io(&config_path, e))?
        .permissions();
    let file = dir.join("model.safetensors");
    replace_atomically(&file, |tmp| {
        candle_core::safetensors::save(tensors, tmp)
            .map_err(|e| Error::corrupt(tmp, e.to_string()))?;
        std::fs::set_permissions(tmp, permissions).map_err(|e| Error::io(tmp, e))
    })?;
    tokenizer.save_pretrained(dir)
}

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

fn hf_config_json(
    model: &Model,
    dtype: DType,
    quantization: Option<serde_json::Value>,
) -> serde_json::Value {
    let c = model.config();
    // The config the model came from, where there is one: it carries every setting of the
    // family (RoPE scaling, layer types, soft-capping) in the family's own spelling.
    let mut config = match &c.hf_config {
        Some(source) => source.clone(),
        None => serde_json::json!({
            "architectures": [c.architecture.class_name()],
            "model_type": c.architecture.model_type(),
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id.first(),
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
        }),
    };
    // What the model is now, whatever the source said.
    config["sliding_window"] = serde_json::json!(c.sliding_window);
    config["torch_dtype"] = serde_json::json!(torch_dtype(dtype));
    config["dtype"] = serde_json::json!(torch_dtype(dtype));
    match quantization {
        Some(q) => config["quantization_config"] = q,
        None => {
            if let Some(map) = config.as_object_mut() {
                map.remove("quantization_config");
            }
        }
    }
    config
}
