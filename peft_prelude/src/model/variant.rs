//! What sets one decoder family apart from the Llama/Mistral block: each family (Qwen 2/3,
//! Gemma 2/3, Llama 3's RoPE) is the same decoder with a few of these switched on, not a copy
//! of it. All off (the default) is Mistral and Llama.

use super::rope_scaling::RopeScaling;

/// Which projections of the attention block carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionBias {
    #[default]
    None,
    /// q, k and v (Qwen 2 / 2.5).
    Qkv,
    /// q, k, v and o (Llama's and Qwen 3's `attention_bias: true`).
    QkvO,
}

impl AttentionBias {
    /// Whether the projection named `name` (`q_proj`, …) has a bias.
    pub fn covers(self, name: &str) -> bool {
        match self {
            AttentionBias::None => false,
            AttentionBias::Qkv => matches!(name, "q_proj" | "k_proj" | "v_proj"),
            AttentionBias::QkvO => matches!(name, "q_proj" | "k_proj" | "v_proj" | "o_proj"),
        }
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// SwiGLU: `silu(gate) · up`.
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// How a layer attends: to every earlier key, or to the last `sliding_window` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Full,
    Sliding,
}

/// The family-specific arithmetic of a decoder (see the module doc).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    pub attention_bias: AttentionBias,
    /// RMSNorm over each head's queries and keys before RoPE (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// Norm weights are stored as offsets from one: `x̂ · (1 + w)` (Gemma). Loaded weights are
    /// kept as `1 + w`, so only loading and export see the convention.
    pub norm_unit_offset: bool,
    pub activation: Activation,
    /// Token embeddings multiplied by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// Gemma 2/3's four norms per layer: the attention and MLP outputs are normed again
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`) before the residual add, and
    /// the MLP's input norm is `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Attention scores pass through `cap · tanh(s / cap)` before the mask (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// Logits pass through `cap · tanh(l / cap)` (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// Scores are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2` (Gemma).
    pub query_pre_attn_scalar: Option<f64>,
    /// Per layer, full or sliding attention. Empty: every layer slides when the config has a
    /// `sliding_window` (Mistral), none does otherwise.
    pub layer_types: Vec<LayerKind>,
    /// RoPE frequency scaling of the (global) layers.
    pub rope_scaling: RopeScaling,
    /// Sliding layers' own RoPE base and scaling (Gemma 3: 10,000 locally, 1,000,000 globally).
    pub local_rope: Option<(f64, RopeScaling)>,
    /// q, k, v as one `qkv_proj` and gate, up as one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
}

impl Variant {
    /// Whether any setting departs from the plain Llama/Mistral block (the fused kernels
    /// written for that block then stand aside where the difference touches them).
    pub fn is_plain_block(&self) -> bool {
        self.attention_bias == AttentionBias::None
            && !self.qk_norm
            && self.activation == Activation::Silu
            && !self.sandwich_norms
    }
}
