//! Model configuration: Hugging Face `config.json` (model_type mistral or llama) or GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use super::variant::{LayerKind, Variant};
use crate::error::{read_json, Error, Result};

/// The decoder families this crate implements: one network, with the differences of each
/// family in the config's [`Variant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Mistral,
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    #[serde(rename = "gemma3_text")]
    Gemma3,
    Phi3,
}

impl Architecture {
    /// The `model_type` transformers writes for it.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Mistral => "mistral",
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3_text",
            Architecture::Phi3 => "phi3",
        }
    }

    /// transformers' model class for it.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Gemma2 => "Gemma2ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
            Architecture::Phi3 => "Phi3ForCausalLM",
        }
    }

    const SUPPORTED: &'static str = "mistral, llama, qwen2, qwen3, gemma2, gemma3_text, phi3";
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
    /// The family's differences from the Llama block (all off for Mistral and Llama).
    #[serde(skip)]
    pub variant: Variant,
    /// The `config.json` the model was read from, which exports write back (with what they
    /// change), so that settings this struct does not model survive a round trip.
    #[serde(skip)]
    pub hf_config: Option<serde_json::Value>,
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

mod family;
pub mod gguf_config;

fn default_max_positions() -> usize {
    4096
}
fn default_rms_eps() -> f64 {
    1e-6
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
    const OFF_WHEN_ZERO: [&str; 13] = [
        "resid_pdrop",
        "embd_pdrop",
        "attention_bias",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
        "mlp_bias",
        "attention_dropout",
        "qkv_bias",
        "use_qk_norm",
        "qk_layernorm",
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
            return Some(format!("{key} {v} (not implemented)"));
        }
    }
    for key in NEUTRAL_WHEN_ONE {
        if let Some(v) = rest.get(key).filter(|v| !one(v)) {
            return Some(format!("{key} {v} (not implemented)"));
        }
    }
    None
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_json_path(path.as_ref())
    }

    fn from_json_path(path: &Path) -> Result<Self> {
        let json: serde_json::Value = read_json(path)?;
        let raw: HfConfigJson = serde_json::from_value(json.clone())
            .map_err(|e| Error::corrupt(path, format!("invalid config: {e}")))?;
        let mut config = Self::from_hf(raw).map_err(|p| p.at(path))?;
        config.hf_config = Some(json);
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
            Some("qwen2") => Architecture::Qwen2,
            Some("qwen3") => Architecture::Qwen3,
            Some("gemma2") => Architecture::Gemma2,
            Some("gemma3_text") => Architecture::Gemma3,
            Some("phi3") => Architecture::Phi3,
            Some(other) => {
                return Err(ConfigProblem::Unsupported(format!(
                    "model_type `{other}` (supported: {}; architectures: {:?})",
                    Architecture::SUPPORTED,
                    raw.architectures.unwrap_or_default()
                )))
            }
            None => {
                return Err(ConfigProblem::Invalid(
                    "config.json has no `model_type`".into(),
                ))
            }
        };
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
        let heads = raw.num_attention_heads;
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads.max(1));
        // The family reads (and takes out of `rest`) its own keys; what is left must not change
        // the arithmetic.
        let mut rest = raw.rest.clone();
        let family = family::read(architecture, &raw, &mut rest)?;
        if let Some(problem) = unsupported_arithmetic(&rest) {
            return Err(ConfigProblem::Unsupported(problem));
        }
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
            rope_theta: family.rope_theta,
            rms_norm_eps: raw.rms_norm_eps,
            sliding_window: family.sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_id: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
            variant: family.variant,
            hf_config: None,
        })
    }

    /// Reads a GGUF file's metadata (see [`gguf_config`]); `read_vector` reads the small
    /// tensors that carry RoPE factors.
    pub fn from_gguf(
        content: &gguf_file::Content,
        path: impl AsRef<Path>,
        read_vector: gguf_config::ReadVector<'_>,
    ) -> Result<Self> {
        gguf_config::from_gguf(content, path.as_ref(), read_vector)
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
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            if value == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        // Stated limits, far above any released model (the largest have a vocabulary of about
        // 2^18, a hidden size of 2^14, 2^7 layers): a file asking for more is corrupt or
        // hostile, and is refused before any size derived from it is allocated or multiplied.
        for (name, value, limit) in [
            ("vocab_size", c.vocab_size, 1usize << 24),
            ("hidden_size", c.hidden_size, 1 << 17),
            ("intermediate_size", c.intermediate_size, 1 << 20),
            ("num_hidden_layers", c.num_hidden_layers, 1 << 12),
            ("num_attention_heads", c.num_attention_heads, 1 << 12),
            ("num_key_value_heads", c.num_key_value_heads, 1 << 12),
            ("head_dim", c.head_dim, 1 << 12),
            (
                "max_position_embeddings",
                c.max_position_embeddings,
                1 << 27,
            ),
        ] {
            if value > limit {
                return fail(format!("{name} is {value}, above the limit of {limit}"));
            }
        }
        if c.num_attention_heads * c.head_dim > 1 << 20 {
            return fail(format!(
                "num_attention_heads x head_dim is {} x {}, above the limit of 2^20",
                c.num_attention_heads, c.head_dim
            ));
        }
        // Every released model uses a base of 10^4 or more; below 1, RoPE's frequencies grow
        // instead of falling, and a subnormal base overflows them.
        if !(c.rope_theta.is_finite() && c.rope_theta >= 1.0) {
            return fail(format!(
                "rope_theta must be at least 1, got {}",
                c.rope_theta
            ));
        }
        // Gemma's caps are 50 and 30 and its scalar the head size: beyond f32's reach (cast to
        // infinity, the cap turns every score into NaN) a value is not a model.
        for (name, value) in [
            ("attn_logit_softcapping", c.variant.attn_logit_softcapping),
            ("final_logit_softcapping", c.variant.final_logit_softcapping),
            ("query_pre_attn_scalar", c.variant.query_pre_attn_scalar),
        ] {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0 && *v <= 1e6)) {
                return fail(format!("{name} must be in (0, 10^6], got {v:e}"));
            }
        }
        if let Some((theta, _)) = &c.variant.local_rope {
            if !(theta.is_finite() && *theta >= 1.0) {
                return fail(format!(
                    "rope_local_base_freq must be at least 1, got {theta}"
                ));
            }
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0) {
            return fail(format!(
                "rms_norm_eps must be a non-negative number, got {}",
                c.rms_norm_eps
            ));
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
        let ropes = std::iter::once(&c.variant.rope_scaling)
            .chain(c.variant.local_rope.as_ref().map(|(_, s)| s));
        for scaling in ropes {
            scaling
                .check_rotary_dim(c.head_dim)
                .map_err(Error::Config)?;
        }
        if !c.variant.layer_types.is_empty() && c.variant.layer_types.len() != c.num_hidden_layers {
            return fail(format!(
                "layer_types has {} entries for {} layers",
                c.variant.layer_types.len(),
                c.num_hidden_layers
            ));
        }
        if c.sliding_window == Some(0) {
            return fail("sliding_window must be positive".into());
        }
        Ok(self)
    }

    /// The projections of a decoder layer, in checkpoint order, each with the block it sits
    /// in (`self_attn` or `mlp`).
    pub fn projection_names(&self) -> &'static [(&'static str, &'static str)] {
        const SEPARATE: [(&str, &str); 7] = [
            ("self_attn", "q_proj"),
            ("self_attn", "k_proj"),
            ("self_attn", "v_proj"),
            ("self_attn", "o_proj"),
            ("mlp", "gate_proj"),
            ("mlp", "up_proj"),
            ("mlp", "down_proj"),
        ];
        const FUSED: [(&str, &str); 4] = [
            ("self_attn", "qkv_proj"),
            ("self_attn", "o_proj"),
            ("mlp", "gate_up_proj"),
            ("mlp", "down_proj"),
        ];
        match self.variant.fused_projections {
            true => &FUSED,
            false => &SEPARATE,
        }
    }

    /// `[out, in]` of the projection named `name` (one of [`projection_names`](Self::projection_names)).
    pub fn projection_shape(&self, name: &str) -> Option<[usize; 2]> {
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let (h, i) = (self.hidden_size, self.intermediate_size);
        Some(match name {
            "q_proj" => [q, h],
            "k_proj" | "v_proj" => [kv, h],
            "qkv_proj" => [q + 2 * kv, h],
            "o_proj" => [h, q],
            "gate_proj" | "up_proj" => [i, h],
            "gate_up_proj" => [2 * i, h],
            "down_proj" => [h, i],
            _ => return None,
        })
    }

    /// How layer `layer` attends.
    pub fn layer_kind(&self, layer: usize) -> LayerKind {
        match self.variant.layer_types.get(layer) {
            Some(kind) => *kind,
            None if self.sliding_window.is_some() => LayerKind::Sliding,
            None => LayerKind::Full,
        }
    }

    /// The window of layer `layer`'s attention (`None`: plain causal).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.layer_kind(layer) {
            LayerKind::Sliding => self.sliding_window,
            LayerKind::Full => None,
        }
    }

    /// The window a KV cache may trim its keys to: only when every layer slides.
    pub fn cache_window(&self) -> Option<usize> {
        self.variant
            .layer_types
            .is_empty()
            .then_some(self.sliding_window)
            .flatten()
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
            variant: Variant::default(),
            hf_config: None,
        }
    }
}
