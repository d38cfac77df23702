//! Model configuration: Hugging Face `config.json` (model_type mistral or llama) or GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};

/// The decoder families this crate implements. Both are the same network; they differ only in
/// defaults (Mistral has a sliding window) and in how checkpoints name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Mistral,
    Llama,
}

/// What the decoder needs to know. Field names follow Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(rename = "model_type")]
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// Each query attends to at most this many keys (itself included). `None`: plain causal.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
}

/// `config.json` as written by transformers (v4 and v5), with only the keys we read.
#[derive(Debug, Deserialize)]
struct HfConfigJson {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    /// transformers v5 writes the RoPE settings here (`rope_theta`, `rope_type`, scaling).
    rope_parameters: Option<serde_json::Value>,
    /// transformers v4's spelling of the RoPE scaling.
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    sliding_window: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    hidden_act: Option<String>,
    quantization_config: Option<serde_json::Value>,
    /// Every other key, checked by [`unsupported_arithmetic`] for settings that change what
    /// the network computes.
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

/// Why a config.json cannot be used.
enum ConfigProblem {
    Unsupported(String),
    Invalid(String),
}

impl ConfigProblem {
    fn message(&self) -> &str {
        match self {
            ConfigProblem::Unsupported(m) | ConfigProblem::Invalid(m) => m,
        }
    }

    fn at(self, path: &Path) -> Error {
        match self {
            ConfigProblem::Unsupported(m) => Error::unsupported(path, m),
            ConfigProblem::Invalid(m) => Error::corrupt(path, m),
        }
    }
}

fn default_max_positions() -> usize {
    4096
}
fn default_rms_eps() -> f64 {
    1e-6
}

/// RoPE variants a GGUF of the `llama` architecture can carry that this decoder does not
/// implement: a scaling type (`{arch}.rope.scaling.type`, llama.cpp's linear / yarn / longrope),
/// Llama 3's frequency factors (the `rope_freqs.weight` tensor), or rotation of only part of
/// each head (`rope.dimension_count` below the head size). llama.cpp applies them; ignoring one
/// would load the model "fine" with wrong logits.
fn unsupported_gguf_rope(content: &gguf_file::Content, arch: &str) -> Option<String> {
    let md = &content.metadata;
    if let Some(v) = md.get(&format!("{arch}.rope.scaling.type")) {
        let kind = v.to_string().map(String::as_str).unwrap_or("?");
        if kind != "none" {
            return Some(format!(
                "{arch}.rope.scaling.type `{kind}` (only plain RoPE is implemented)"
            ));
        }
    }
    if let Some(f) = md
        .get(&format!("{arch}.rope.scaling.factor"))
        .and_then(|v| v.to_f32().ok())
        .filter(|f| *f != 0.0 && *f != 1.0)
    {
        return Some(format!(
            "{arch}.rope.scaling.factor {f} (only plain RoPE is implemented)"
        ));
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Some(
            "tensor rope_freqs.weight (Llama 3 RoPE frequency scaling is not implemented)".into(),
        );
    }
    let get = |k: &str| md.get(&format!("{arch}.{k}")).and_then(|v| v.to_u32().ok());
    if let (Some(rotated), Some(heads), Some(hidden)) = (
        get("rope.dimension_count"),
        get("attention.head_count"),
        get("embedding_length"),
    ) {
        let head_dim = get("attention.key_length").unwrap_or(hidden / heads.max(1));
        if rotated != head_dim {
            return Some(format!(
                "{arch}.rope.dimension_count {rotated} with heads of {head_dim} (partial rotation is not implemented)"
            ));
        }
    }
    None
}

/// A RoPE setting (`rope_scaling` or `rope_parameters`) other than plain RoPE, named; `None`
/// when it is plain. Until scaled RoPE is implemented, running a model with its scaling
/// ignored would give wrong logits silently (a Llama 3.1 with `llama3` scaling: 0.44 off).
fn unsupported_rope(field: &str, value: &serde_json::Value) -> Option<String> {
    let map = match value {
        serde_json::Value::Null => return None,
        serde_json::Value::Object(map) => map,
        other => return Some(format!("{field} {other} (expected an object)")),
    };
    let kind = map.get("rope_type").or_else(|| map.get("type"));
    match kind {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(k)) if k == "default" => {}
        Some(k) => {
            return Some(format!(
                "{field}: rope_type {k} (only plain RoPE, \"default\", is implemented)"
            ))
        }
    }
    // Keys that change the rotation even under the default type.
    for key in ["factor", "partial_rotary_factor", "mrope_section"] {
        match map.get(key) {
            None | Some(serde_json::Value::Null) => {}
            Some(v) if key != "mrope_section" && v.as_f64() == Some(1.0) => {}
            Some(v) => return Some(format!("{field}: {key} {v} (not implemented)")),
        }
    }
    None
}

/// A `config.json` key outside the ones we read whose value changes what the network computes
/// and which this decoder does not implement, named with its value; `None` when every such key
/// has the value that means "off". transformers 5.24's Mistral and Llama configs write, besides
/// what [`HfConfigJson`] reads: `attention_bias`, `mlp_bias` (bias on the projections),
/// `attention_dropout` (dropout on the attention weights while training), `pretraining_tp`
/// (a split of each matmul into slices: the same sums, so any value is accepted),
/// `initializer_range`, `use_cache`, `pad_token_id`, `dtype`, `transformers_version`. The
/// other keys listed here are how related families (Qwen, Gemma, Phi, Granite) spell changes
/// to the arithmetic; a config that borrows `model_type` "llama" with one of them set is
/// refused rather than run as plain Llama.
fn unsupported_arithmetic(rest: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    use serde_json::Value;
    let off = |v: &Value| -> bool {
        match v {
            Value::Null => true,
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_f64() == Some(0.0),
            Value::Array(a) => a.is_empty(),
            _ => false,
        }
    };
    let one = |v: &Value| v.is_null() || v.as_f64() == Some(1.0);
    // Keys whose "off" value is false / 0 / null.
    const OFF_WHEN_ZERO: [&str; 11] = [
        "attention_bias",
        "mlp_bias",
        "attention_dropout",
        "qkv_bias",
        "use_qk_norm",
        "qk_layernorm",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
        "no_rope_layers",
        "hidden_dropout",
    ];
    // Keys whose neutral value is 1.
    const NEUTRAL_WHEN_ONE: [&str; 5] = [
        "partial_rotary_factor",
        "embedding_multiplier",
        "residual_multiplier",
        "logits_scaling",
        "attention_multiplier",
    ];
    for key in OFF_WHEN_ZERO {
        if let Some(v) = rest.get(key).filter(|v| !off(v)) {
            return Some(format!("{key} {v} (not implemented for mistral/llama)"));
        }
    }
    for key in NEUTRAL_WHEN_ONE {
        if let Some(v) = rest.get(key).filter(|v| !one(v)) {
            return Some(format!("{key} {v} (not implemented)"));
        }
    }
    if let Some(types) = rest.get("layer_types").and_then(Value::as_array) {
        // Per-layer attention kinds: only "every layer alike" is what sliding_window means here.
        let mut kinds: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
        kinds.dedup();
        if kinds.len() > 1
            || kinds
                .iter()
                .any(|k| !matches!(*k, "full_attention" | "sliding_attention"))
        {
            return Some(format!(
                "layer_types {} (layers of different attention kinds are not implemented)",
                rest["layer_types"]
            ));
        }
    }
    if let Some(act) = rest.get("hidden_activation").filter(|v| !v.is_null()) {
        if act.as_str() != Some("silu") {
            return Some(format!("hidden_activation {act} (expected silu)"));
        }
    }
    None
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let raw: HfConfigJson = read_json(path)?;
        let config = Self::from_hf(raw).map_err(|p| p.at(path))?;
        config.validated().map_err(|e| match e {
            Error::Config(what) => Error::corrupt(path, what),
            other => other,
        })
    }

    /// Parses the text of a `config.json` (for tests and in-memory use).
    pub fn from_json_str(json: &str) -> Result<Self> {
        let raw: HfConfigJson =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("invalid JSON: {e}")))?;
        Self::from_hf(raw)
            .map_err(|p| Error::Config(p.message().to_string()))?
            .validated()
    }

    fn from_hf(raw: HfConfigJson) -> std::result::Result<Self, ConfigProblem> {
        let architecture = match raw.model_type.as_deref() {
            Some("mistral") => Architecture::Mistral,
            Some("llama") => Architecture::Llama,
            Some(other) => {
                return Err(ConfigProblem::Unsupported(format!(
                    "model_type `{other}` (supported: mistral, llama; architectures: {:?})",
                    raw.architectures.unwrap_or_default()
                )))
            }
            None => {
                return Err(ConfigProblem::Invalid(
                    "config.json has no `model_type`".into(),
                ))
            }
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ConfigProblem::Unsupported(format!(
                    "hidden_act `{act}` (expected silu)"
                )));
            }
        }
        for (field, value) in [
            ("rope_scaling", &raw.rope_scaling),
            ("rope_parameters", &raw.rope_parameters),
        ] {
            if let Some(problem) = value.as_ref().and_then(|v| unsupported_rope(field, v)) {
                return Err(ConfigProblem::Unsupported(problem));
            }
        }
        if let Some(problem) = unsupported_arithmetic(&raw.rest) {
            return Err(ConfigProblem::Unsupported(problem));
        }
        if let Some(q) = raw.quantization_config.as_ref() {
            // bitsandbytes 4-bit checkpoints load through `quant::bnb` (which checks the rest).
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("?");
            if method != "bitsandbytes" {
                return Err(ConfigProblem::Unsupported(format!(
                    "quantized checkpoint (quant_method `{method}`); only bitsandbytes 4-bit (nf4) loads"
                )));
            }
        }
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                raw.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|t| t.as_f64())
            })
            .unwrap_or(10_000.0);
        let heads = raw.num_attention_heads;
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads.max(1));
        Ok(ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps,
            sliding_window: raw.sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_id: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
        })
    }

    /// Reads the `llama` architecture's metadata from a GGUF file. Mistral GGUFs use it too
    /// (llama.cpp writes no sliding window for them, so none is applied, as llama.cpp does).
    pub fn from_gguf(content: &gguf_file::Content, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| Error::corrupt(path, "GGUF has no general.architecture"))?;
        if arch != "llama" && arch != "mistral" {
            return Err(Error::unsupported(
                path,
                format!("GGUF architecture `{arch}` (supported: llama, mistral)"),
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let get_u32 = |k: &str| -> Result<Option<usize>> {
            match md.get(&key(k)) {
                None => Ok(None),
                Some(v) => v
                    .to_u32()
                    .or_else(|_| v.to_u64().map(|x| x as u32))
                    .map(|x| Some(x as usize))
                    .map_err(|e| Error::corrupt(path, format!("metadata {}: {e}", key(k)))),
            }
        };
        let require = |k: &str| -> Result<usize> {
            get_u32(k)?.ok_or_else(|| Error::corrupt(path, format!("missing metadata {}", key(k))))
        };
        let get_f32 = |k: &str| -> Result<Option<f64>> {
            match md.get(&key(k)) {
                None => Ok(None),
                Some(v) => v
                    .to_f32()
                    .map(|x| Some(x as f64))
                    .map_err(|e| Error::corrupt(path, format!("metadata {}: {e}", key(k)))),
            }
        };
        if let Some(problem) = unsupported_gguf_rope(content, arch) {
            return Err(Error::unsupported(path, problem));
        }
        let hidden_size = require("embedding_length")?;
        let heads = require("attention.head_count")?;
        let kv_heads = get_u32("attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = match get_u32("attention.key_length")? {
            Some(d) => d,
            None => hidden_size / heads.max(1),
        };
        let vocab_size = match get_u32("vocab_size")? {
            Some(v) => v,
            None => match md.get("tokenizer.ggml.tokens") {
                Some(gguf_file::Value::Array(tokens)) => tokens.len(),
                _ => content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| Error::corrupt(path, "cannot determine the vocabulary size"))?,
            },
        };
        let token_id = |k: &str| -> Option<u32> { md.get(k).and_then(|v| v.to_u32().ok()) };
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size,
            intermediate_size: require("feed_forward_length")?,
            num_hidden_layers: require("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: get_u32("context_length")?.unwrap_or(4096),
            rope_theta: get_f32("rope.freq_base")?.unwrap_or(10_000.0),
            rms_norm_eps: get_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            sliding_window: None,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: token_id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
        }
        .validated()
        .map_err(|e| match e {
            Error::Config(what) => Error::corrupt(path, what),
            other => other,
        })
    }

    /// Checks the invariants the decoder relies on.
    pub fn validated(self) -> Result<Self> {
        let c = &self;
        let fail = |what: String| Err(Error::Config(what));
        for (name, value) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", c.head_dim),
        ] {
            if value == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            return fail(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                c.num_attention_heads, c.num_key_value_heads
            ));
        }
        if !c.head_dim.is_multiple_of(2) {
            return fail(format!("head_dim ({}) must be even for RoPE", c.head_dim));
        }
        if c.sliding_window == Some(0) {
            return fail("sliding_window must be positive".into());
        }
        Ok(self)
    }

    /// Number of query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Mistral 7B v0.1/v0.3 shape (for synthetic benchmarks).
    pub fn mistral_7b() -> Self {
        ModelConfig {
            architecture: Architecture::Mistral,
            vocab_size: 32768,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            max_position_embeddings: 32768,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-5,
            sliding_window: None,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: vec![2],
        }
    }
}
