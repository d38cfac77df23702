//! The Mistral/Llama decoder, top to bottom: token embedding, pre-norm blocks of grouped-query
//! attention and a SwiGLU MLP, final norm, tied or untied head. Logits for every position;
//! every op differentiable; every projection reachable by its Hugging Face module path
//! ([`super::paths`]). Masks are built in [`super::mask`], the layer-by-layer pass for
//! gradient checkpointing is [`super::checkpoint`].
//!
//! Where a fused op applies (LoRA blocks on the CPU in f32: the op's module says), a layer
//! runs it; otherwise it composes the same arithmetic from the per-op kernels.

use candle_core::{DType, Device, Tensor, D};
use peft_kernels::lora_qkv::HeadShape;

use super::cache::KvCache;
use super::config::ModelConfig;
use super::forward::{Forward, Input};
use super::head::{FrozenHead, Int8HeadCache};
use super::linear::{FrozenLinear, FrozenWeight, Linear};
use super::mask::{attention_bias, mask_rows, segment_rows, AttentionLayout};
use super::norm::RmsNorm;
use super::rope::Rope;
use super::variant::{Activation, LayerKind};
use crate::error::{Error, Result};

/// A module that adjusts a block's output given its input (bottleneck adapters hook in here).
pub trait BlockAdapter: Send + Sync + std::fmt::Debug {
    /// `input`: what the block (attention or MLP) received, after its norm; `output`: what
    /// the block produced, before the residual add. Returns the adjusted output.
    fn forward(&self, input: &Tensor, output: &Tensor) -> Result<Tensor>;
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// A replacement for the token-embedding lookup (PEFT's `modules_to_save` trains a copy of
/// the table per adapter).
pub trait TokenEmbedding: Send + Sync + std::fmt::Debug {
    /// Rows for `ids` (flat u32), `[n, hidden]`; `None` to use the model's own table.
    fn lookup(&self, ids: &Tensor) -> Result<Option<Tensor>>;
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// What the layers of one kind (full or sliding attention) share in a forward pass: the RoPE
/// tables of the tokens' positions and the attention bias (`None`: every query sees every key).
pub(crate) struct Tables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Option<Tensor>,
}

/// What every layer of one forward pass shares: the tables of each layer kind the model has.
pub(crate) struct Pass {
    pub full: Option<Tables>,
    pub sliding: Option<Tables>,
}

impl Pass {
    fn tables(&self, kind: LayerKind) -> Result<&Tables> {
        let tables = match kind {
            LayerKind::Full => self.full.as_ref(),
            LayerKind::Sliding => self.sliding.as_ref(),
        };
        tables.ok_or_else(|| Error::InvalidArgument(format!("no {kind:?} attention tables")))
    }
}

/// Projections that read the same input: `N` modules, or one fused module whose output is
/// theirs side by side (Phi-3's `qkv_proj` and `gate_up_proj`).
#[derive(Debug)]
pub enum Parallel<const N: usize> {
    Separate([Box<dyn Linear>; N]),
    Fused(Box<dyn Linear>),
}

impl<const N: usize> Parallel<N> {
    /// Each projection's output for `x`, the fused output split into `widths`.
    fn forward(&self, x: &Tensor, widths: [usize; N]) -> Result<[Tensor; N]> {
        let outputs: Vec<Tensor> = match self {
            Parallel::Separate(ps) => match crate::quant::ggml::forward_together(ps, x)? {
                Some(ys) => ys,
                None => ps.iter().map(|p| p.forward(x)).collect::<Result<_>>()?,
            },
            Parallel::Fused(p) => {
                let y = p.forward(x)?;
                let mut start = 0;
                let mut parts = Vec::with_capacity(N);
                for w in widths {
                    parts.push(y.narrow(D::Minus1, start, w)?.contiguous()?);
                    start += w;
                }
                parts
            }
        };
        Ok(outputs.try_into().expect("one output per projection"))
    }

    /// The `i`-th projection when they are separate modules.
    pub fn separate(&self, i: usize) -> Option<&dyn Linear> {
        match self {
            Parallel::Separate(ps) => ps.get(i).map(|p| p.as_ref()),
            Parallel::Fused(_) => None,
        }
    }

    /// The module at `index` of the separate ones, or the fused one (`None`).
    pub(crate) fn slot_mut(&mut self, index: Option<usize>) -> Option<&mut Box<dyn Linear>> {
        match (self, index) {
            (Parallel::Separate(ps), Some(i)) => ps.get_mut(i),
            (Parallel::Fused(p), None) => Some(p),
            _ => None,
        }
    }

    /// The module at `index` of the separate ones, or the fused one (`None`).
    pub(crate) fn slot(&self, index: Option<usize>) -> Option<&dyn Linear> {
        match (self, index) {
            (Parallel::Separate(ps), Some(i)) => ps.get(i).map(|p| p.as_ref()),
            (Parallel::Fused(p), None) => Some(p.as_ref()),
            _ => None,
        }
    }
}

/// Grouped-query self-attention.
#[derive(Debug)]
pub struct Attention {
    /// q, k and v.
    pub qkv: Parallel<3>,
    pub o_proj: Box<dyn Linear>,
    /// Per-head norms of the queries and keys before RoPE (Qwen 3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    shape: HeadShape,
    /// What scores are multiplied by (`head_dim^-1/2` unless the family says otherwise).
    scale: f64,
    /// `cap · tanh(score / cap)` before the mask (Gemma 2).
    softcap: Option<f64>,
}

impl Attention {
    /// Heads `[b, t, heads · d]` (before `o_proj`) of the normed input `h: [b, t, hidden]`;
    /// keys and values go into `cache` (layer `layer`) first, when given.
    fn heads(
        &self,
        h: &Tensor,
        pass: &Tables,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let HeadShape {
            heads,
            kv_heads,
            head_dim: d,
        } = self.shape;
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?)
        };
        let [q, k, v] = self
            .qkv
            .forward(h, [heads * d, kv_heads * d, kv_heads * d])?;
        let mut q = split(q, heads)?;
        let mut k = split(k, kv_heads)?;
        let v = split(v, kv_heads)?;
        if let Some(norm) = &self.q_norm {
            q = norm.forward(&q.contiguous()?)?;
        }
        if let Some(norm) = &self.k_norm {
            k = norm.forward(&k.contiguous()?)?;
        }
        // The fused RoPE reads the transposed views directly and returns contiguous tensors.
        let q = Rope::apply(&q, &pass.cos, &pass.sin)?;
        let k = Rope::apply(&k, &pass.cos, &pass.sin)?;
        self.attend(q, k, v.contiguous()?, pass, cache)
    }

    /// q, k, v straight from the residual stream `x` as one op (norm, projections, RoPE),
    /// where `peft_kernels::lora_qkv` applies and every projection is a plain LoRA product:
    /// it keeps neither the normed input nor the unrotated projections. `None`: compose.
    fn fused_qkv(
        &self,
        x: &Tensor,
        norm: &RmsNorm,
        pass: &Tables,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        if self.q_norm.is_some() || self.k_norm.is_some() || !peft_kernels::lora_qkv::applies(x) {
            return Ok(None);
        }
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let lora = |i: usize| self.qkv.separate(i).and_then(|p| p.fused_lora(rows));
        let (Some(q), Some(k), Some(v)) = (lora(0), lora(1), lora(2)) else {
            return Ok(None);
        };
        Ok(Some(peft_kernels::lora_qkv::lora_qkv(
            x,
            (norm.weight(), norm.eps()),
            [&q, &k, &v],
            self.shape,
            (&pass.cos, &pass.sin),
        )?))
    }

    /// Attention over heads-first `q: [b, heads, t, d]`, `k`, `v: [b, kv_heads, t, d]`
    /// (appended to the cache first, if any): `[b, t, heads · d]`, the layout `o_proj` reads.
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pass: &Tables,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, _, t, d) = q.dims4()?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        // Grouped-query attention without copying K/V: query head h uses kv head h / groups
        // (repeat_interleave), so view q as [b, kv_heads, groups · t, d].
        let groups = self.shape.heads / self.shape.kv_heads;
        let q = q.reshape((b, self.shape.kv_heads, groups * t, d))?;
        if let Some(cap) = self.softcap {
            return soft_capped_attention(&q, &k, &v, pass.mask.as_ref(), groups, self.scale, cap);
        }
        let scale = self.scale;
        // Keeps q, k, v, the output and one log-sum-exp per query for the backward, not the
        // [queries, keys] scores and probabilities.
        Ok(peft_kernels::attention::attention(
            &q,
            &k,
            &v,
            pass.mask.as_ref(),
            groups,
            scale,
        )?)
    }

    /// `residual + o_proj(heads)`; one op where `lora_linear_residual` applies (the
    /// projection's output is not kept for the backward).
    fn project_onto(&self, heads: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let rows = heads.elem_count() / heads.dim(D::Minus1)?.max(1);
        let fused = peft_kernels::lora::residual_applies(residual)
            .then(|| self.o_proj.fused_lora(rows))
            .flatten();
        Ok(match fused {
            Some(p) => peft_kernels::lora_linear_residual(heads, residual, &p)?,
            None => (residual + self.o_proj.forward(heads)?)?,
        })
    }
}

/// Attention with Gemma 2's soft-capped scores, composed from differentiable ops (the fused
/// kernel has no cap): `softmax(cap · tanh(scale · q·kᵀ / cap) + mask) · v`, for `q` viewed as
/// `[b, kv_heads, groups · t, d]`; returns `[b, t, heads · d]` like the kernel.
fn soft_capped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    groups: usize,
    scale: f64,
    cap: f64,
) -> Result<Tensor> {
    let (b, kv_heads, gt, d) = q.dims4()?;
    let s = k.dim(2)?;
    let t = gt / groups;
    let acc = super::norm::accumulation_dtype(q.dtype());
    let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?.to_dtype(acc)?;
    let scores = ((scores / cap)?.tanh()? * cap)?;
    let scores = match mask {
        Some(m) => scores
            .reshape((b, kv_heads, groups, t, s))?
            .broadcast_add(&m.to_dtype(acc)?.unsqueeze(1)?)?
            .reshape((b, kv_heads, gt, s))?,
        None => scores,
    };
    // A softmax of differentiable ops (candle's fused one has no backward).
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let out = probs.to_dtype(v.dtype())?.matmul(&v.contiguous()?)?;
    Ok(out
        .reshape((b, kv_heads * groups, t, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, kv_heads * groups * d))?)
}

/// The gated MLP: SwiGLU, or GeGLU for Gemma.
#[derive(Debug)]
pub struct Mlp {
    /// gate and up.
    pub gate_up: Parallel<2>,
    pub down_proj: Box<dyn Linear>,
    activation: Activation,
    intermediate_size: usize,
}

impl Mlp {
    /// `down(act(gate(x)) * up(x))`; for SwiGLU the middle is fused into the down projection.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let i = self.intermediate_size;
        let [gate, up] = self.gate_up.forward(x, [i, i])?;
        match self.activation {
            Activation::Silu => self.down_proj.forward_swiglu(&gate, &up),
            Activation::GeluTanh => self.down_proj.forward(&peft_kernels::geglu(&gate, &up)?),
        }
    }

    /// `residual + forward(norm(residual))` as one op where `peft_kernels::lora_mlp` applies
    /// and all three projections are plain LoRA products: it keeps neither the normed input
    /// nor the down projection's output for the backward, and over 8-bit integer bases keeps
    /// the gate and up activations as 8-bit blocks. `None`: compose.
    pub fn forward_block(&self, residual: &Tensor, norm: &RmsNorm) -> Result<Option<Tensor>> {
        if self.activation != Activation::Silu || !peft_kernels::lora_mlp::applies(residual) {
            return Ok(None);
        }
        let rows = residual.elem_count() / residual.dim(D::Minus1)?.max(1);
        let lora = |i: usize| self.gate_up.separate(i).and_then(|p| p.fused_lora(rows));
        let (Some(g), Some(u), Some(d)) = (lora(0), lora(1), self.down_proj.fused_lora(rows))
        else {
            return Ok(None);
        };
        let int8 = [&g, &u, &d]
            .iter()
            .all(|p| matches!(p.w, peft_kernels::FrozenOperand::Int8(_)));
        Ok(Some(peft_kernels::lora_mlp::lora_mlp(
            residual,
            (norm.weight(), norm.eps()),
            [&g, &u, &d],
            int8,
        )?))
    }
}

/// One pre-norm block: `x + attention(norm(x))`, then `x + mlp(norm(x))`. With Gemma's
/// sandwich norms: `x + post_norm(attention(norm(x)))`, then `x + post_ff_norm(mlp(pre_ff_norm(x)))`.
#[derive(Debug)]
pub struct DecoderLayer {
    /// Its place in the stack (the KV cache's layer).
    pub index: usize,
    /// Full or sliding-window attention.
    pub kind: LayerKind,
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// The MLP's input norm, or (with sandwich norms) the attention output's norm.
    pub post_attention_layernorm: RmsNorm,
    /// Sandwich norms only: the MLP's input norm and its output's norm.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    pub post_feedforward_layernorm: Option<RmsNorm>,
    pub mlp: Mlp,
    /// Applied to the attention block's output.
    pub attn_adapter: Option<Box<dyn BlockAdapter>>,
    /// Applied to the MLP block's output.
    pub mlp_adapter: Option<Box<dyn BlockAdapter>>,
}

impl DecoderLayer {
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pass: &Pass,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let tables = pass.tables(self.kind)?;
        if self.pre_feedforward_layernorm.is_some() {
            return self.sandwich_forward(x, tables, cache);
        }
        let x = self.attention_block(x, tables, cache)?;
        self.mlp_block(&x)
    }

    /// Gemma's block: every sublayer's output is normed before the residual add.
    fn sandwich_forward(
        &self,
        x: &Tensor,
        tables: &Tables,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let missing = || Error::InvalidArgument("sandwich norms are incomplete".into());
        let h = self.input_layernorm.forward(x)?;
        let heads = self
            .self_attn
            .heads(&h, tables, cache.map(|c| (c, self.index)))?;
        let mut out = self.self_attn.o_proj.forward(&heads)?;
        if let Some(adapter) = &self.attn_adapter {
            out = adapter.forward(&h, &out)?;
        }
        let x = (x + self.post_attention_layernorm.forward(&out)?)?;
        let pre = self
            .pre_feedforward_layernorm
            .as_ref()
            .ok_or_else(missing)?;
        let post = self
            .post_feedforward_layernorm
            .as_ref()
            .ok_or_else(missing)?;
        let h = pre.forward(&x)?;
        let mut out = self.mlp.forward(&h)?;
        if let Some(adapter) = &self.mlp_adapter {
            out = adapter.forward(&h, &out)?;
        }
        Ok((&x + post.forward(&out)?)?)
    }

    fn attention_block(
        &self,
        x: &Tensor,
        pass: &Tables,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let attn = &self.self_attn;
        let Some(adapter) = &self.attn_adapter else {
            // Without a cache, q, k and v come from one op where it applies.
            let fused = match cache {
                None => attn.fused_qkv(x, &self.input_layernorm, pass)?,
                Some(_) => None,
            };
            let heads = match fused {
                Some((q, k, v)) => attn.attend(q, k, v, pass, None)?,
                None => {
                    let h = self.input_layernorm.forward(x)?;
                    attn.heads(&h, pass, cache.map(|c| (c, self.index)))?
                }
            };
            return attn.project_onto(&heads, x);
        };
        let h = self.input_layernorm.forward(x)?;
        let heads = attn.heads(&h, pass, cache.map(|c| (c, self.index)))?;
        let out = adapter.forward(&h, &attn.o_proj.forward(&heads)?)?;
        Ok((x + out)?)
    }

    fn mlp_block(&self, x: &Tensor) -> Result<Tensor> {
        let Some(adapter) = &self.mlp_adapter else {
            if let Some(y) = self.mlp.forward_block(x, &self.post_attention_layernorm)? {
                return Ok(y);
            }
            let h = self.post_attention_layernorm.forward(x)?;
            return Ok((x + self.mlp.forward(&h)?)?);
        };
        let h = self.post_attention_layernorm.forward(x)?;
        let out = adapter.forward(&h, &self.mlp.forward(&h)?)?;
        Ok((x + out)?)
    }
}

/// Everything [`Model::new`] needs, by Hugging Face names.
pub struct ModelWeights {
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `None` when the embeddings are tied.
    pub lm_head: Option<Tensor>,
}

pub struct LayerWeights {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    /// Each `[out, in]` (dense or quantized), with its bias, in the order of
    /// [`ModelConfig::projection_names`]: q, k, v, o, gate, up, down, or Phi-3's qkv, o,
    /// gate_up, down.
    pub projections: Vec<FrozenLinear>,
    /// Per-head query and key norms `[head_dim]` (Qwen 3, Gemma 3).
    pub qk_norms: Option<(Tensor, Tensor)>,
    /// Gemma's pre- and post-feed-forward norms `[hidden]`.
    pub feedforward_norms: Option<(Tensor, Tensor)>,
}

/// The decoder.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    embed_tokens: Tensor,
    embed_override: Option<Box<dyn TokenEmbedding>>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Box<dyn Linear>,
    /// The head on integer products, for losses over a quantized base ([`Model::frozen_head`]).
    head_int8: Int8HeadCache,
    /// RoPE of full-attention layers (of every layer, unless `local_rope`).
    rope: Rope,
    /// RoPE of sliding-window layers where it differs (Gemma 3).
    local_rope: Option<Rope>,
    device: Device,
}

/// A forward pass's input, embedded, with what its layers share.
pub(crate) struct Prepared<'a> {
    pub x: Tensor,
    pub pass: Pass,
    pub cache: Option<&'a mut KvCache>,
    /// The new tokens' padding, for the cache to remember.
    pub new_mask: Option<Vec<Vec<f32>>>,
    pub batch: usize,
    pub seq: usize,
}

impl Model {
    pub fn new(config: ModelConfig, weights: ModelWeights) -> Result<Self> {
        crate::threads::settle_thread_count();
        let device = weights.embed_tokens.device().clone();
        let v = &config.variant;
        let eps = config.rms_norm_eps;
        // Gemma stores norm weights as offsets from one; the decoder keeps `1 + w`.
        let norm = |w: Tensor| -> Result<RmsNorm> {
            let w = if v.norm_unit_offset { (w + 1.0)? } else { w };
            Ok(RmsNorm::new(w, eps))
        };
        let shape = HeadShape {
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        let scale = 1.0
            / v.query_pre_attn_scalar
                .unwrap_or(config.head_dim as f64)
                .sqrt();
        let mut layers = Vec::with_capacity(weights.layers.len());
        let fused = config.variant.fused_projections;
        for (index, l) in weights.layers.into_iter().enumerate() {
            let expected = config.projection_names().len();
            if l.projections.len() != expected {
                return Err(Error::InvalidArgument(format!(
                    "layer {index} has {} projections, expected {expected}",
                    l.projections.len()
                )));
            }
            let mut ps = l
                .projections
                .into_iter()
                .map(|w| -> Box<dyn Linear> { Box::new(w) });
            let mut next = || ps.next().expect("counted above");
            let (qkv, o, gate_up, down) = match fused {
                true => (
                    Parallel::Fused(next()),
                    next(),
                    Parallel::Fused(next()),
                    next(),
                ),
                false => (
                    Parallel::Separate([next(), next(), next()]),
                    next(),
                    Parallel::Separate([next(), next()]),
                    next(),
                ),
            };
            let (q_norm, k_norm) = match l.qk_norms {
                Some((qn, kn)) => (Some(norm(qn)?), Some(norm(kn)?)),
                None => (None, None),
            };
            let (pre_ff, post_ff) = match l.feedforward_norms {
                Some((pre, post)) => (Some(norm(pre)?), Some(norm(post)?)),
                None => (None, None),
            };
            layers.push(DecoderLayer {
                index,
                kind: config.layer_kind(index),
                input_layernorm: norm(l.input_layernorm)?,
                self_attn: Attention {
                    qkv,
                    o_proj: o,
                    q_norm,
                    k_norm,
                    shape,
                    scale,
                    softcap: v.attn_logit_softcapping,
                },
                post_attention_layernorm: norm(l.post_attention_layernorm)?,
                pre_feedforward_layernorm: pre_ff,
                post_feedforward_layernorm: post_ff,
                mlp: Mlp {
                    gate_up,
                    down_proj: down,
                    activation: v.activation,
                    intermediate_size: config.intermediate_size,
                },
                attn_adapter: None,
                mlp_adapter: None,
            });
        }
        let lm_head = weights
            .lm_head
            .unwrap_or_else(|| weights.embed_tokens.clone());
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            v.rope_scaling.clone(),
            config.max_position_embeddings,
            &device,
        )?;
        let local_rope = v
            .local_rope
            .as_ref()
            .map(|(theta, scaling)| {
                Rope::new(
                    config.head_dim,
                    *theta,
                    scaling.clone(),
                    config.max_position_embeddings,
                    &device,
                )
            })
            .transpose()?;
        Ok(Model {
            embed_tokens: weights.embed_tokens.detach(),
            embed_override: None,
            layers,
            norm: norm(weights.norm)?,
            lm_head: Box::new(FrozenLinear::new(lm_head, None)),
            head_int8: Int8HeadCache::default(),
            rope,
            local_rope,
            device,
            config,
        })
    }

    /// Logits `[batch, seq, vocab]` for every position of `ids: [batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(Forward::ids(ids))
    }

    /// The general forward pass (see [`Forward`]).
    pub fn forward_with(&self, args: Forward<'_>) -> Result<Tensor> {
        self.logits_of(&self.hidden_states(args)?)
    }

    /// The head applied to final-norm hidden states (with Gemma 2's logit soft-capping).
    pub fn logits_of(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        match self.config.variant.final_logit_softcapping {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }

    /// Logits `[batch, vocab]` of the last position only (what decoding needs; the head runs
    /// on one position instead of all).
    pub fn forward_last(&self, args: Forward<'_>) -> Result<Tensor> {
        if args.cache.is_some() && rayon::current_thread_index().is_none() {
            // Decoding: the head too on the pool (see `hidden_states`).
            return crate::threads::on_pool_with_spinning_helpers(|| self.forward_last(args));
        }
        let hidden = self.hidden_states(args)?;
        let t = hidden.dim(1)?;
        self.logits_of(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// Final-norm hidden states `[batch, seq, hidden]` (what the head is applied to).
    pub fn hidden_states(&self, args: Forward<'_>) -> Result<Tensor> {
        if args.cache.is_some() && rayon::current_thread_index().is_none() {
            // Decoding: run the pass on a pool worker, so every parallel loop inside (hundreds
            // per token) joins from within the pool instead of waking the workers from outside
            // and putting this thread to sleep (a third of decoding time), with the other
            // workers spinning between the loops instead of parking. (A training step runs
            // on the pool too, from `sft::batch_gradients`: its activations, freed off the
            // thread that made them, once grew a second malloc arena, peak RSS 2.9 -> 4.5 GB
            // on SmolLM2; the single arena `crate::threads` sets keeps them in one heap.)
            return crate::threads::on_pool_with_spinning_helpers(|| self.hidden_states(args));
        }
        let Prepared {
            mut x,
            pass,
            mut cache,
            new_mask,
            batch,
            seq,
        } = self.prepare(args)?;
        for layer in &self.layers {
            x = layer.forward(&x, &pass, cache.as_deref_mut())?;
        }
        if let Some(c) = cache {
            c.commit(seq, new_mask, batch)?;
        }
        self.norm.forward(&x)
    }

    /// Embeds the input and builds what the layers share: positions (the tokens' slots unless
    /// given), their RoPE tables, the attention bias over the cache and the new tokens.
    pub(crate) fn prepare<'a>(&self, args: Forward<'a>) -> Result<Prepared<'a>> {
        let Forward {
            input,
            attention_mask,
            position_ids,
            segment_ids,
            cache,
        } = args;
        let x = match input {
            Input::Ids(ids) => self.embed(ids)?,
            Input::Embeds(e) => {
                let (_, _, h) = e.dims3()?;
                if h != self.config.hidden_size {
                    return Err(Error::InvalidArgument(format!(
                        "input embeddings have width {h}, the model's hidden_size is {}",
                        self.config.hidden_size
                    )));
                }
                e.to_dtype(self.dtype())?
            }
        };
        let x = match self.config.variant.scale_embeddings {
            // Gemma: times sqrt(hidden), rounded to the activations' dtype as transformers does.
            true => (x * self.embedding_scale()?)?,
            false => x,
        };
        let (batch, seq, _) = x.dims3()?;
        if seq == 0 {
            return Err(Error::InvalidArgument("empty input sequence".into()));
        }
        let past = cache.as_deref().map_or(0, |c| c.seen());
        if segment_ids.is_some() && past > 0 {
            return Err(Error::InvalidArgument(
                "segment ids (packed sequences) cannot be combined with a filled cache".into(),
            ));
        }
        let new_mask = attention_mask
            .map(|m| mask_rows(m, batch, seq))
            .transpose()?;
        let segments = segment_ids
            .map(|s| segment_rows(s, batch, seq))
            .transpose()?;
        let positions = match position_ids {
            Some(p) => p.to_dtype(DType::U32)?,
            None => {
                let row: Vec<u32> = (past..past + seq).map(|p| p as u32).collect();
                Tensor::from_vec(row, (1, seq), &self.device)?
            }
        };
        let tables = |kind: LayerKind| -> Result<Tables> {
            let rope = match kind {
                LayerKind::Sliding => self.local_rope.as_ref().unwrap_or(&self.rope),
                LayerKind::Full => &self.rope,
            };
            let (cos, sin) = rope.tables(&positions)?;
            let mask = attention_bias(
                &AttentionLayout {
                    batch,
                    seq,
                    cache_start: cache.as_deref().map_or(0, |c| c.start()),
                    past,
                    window: match kind {
                        LayerKind::Sliding => self.config.sliding_window,
                        LayerKind::Full => None,
                    },
                    cached_key_mask: cache.as_deref().and_then(|c| c.key_mask()),
                    new_key_mask: new_mask.as_ref(),
                    segments: segments.as_ref(),
                },
                &self.device,
            )?;
            Ok(Tables { cos, sin, mask })
        };
        let has = |kind: LayerKind| self.layers.iter().any(|l| l.kind == kind);
        let pass = Pass {
            full: has(LayerKind::Full)
                .then(|| tables(LayerKind::Full))
                .transpose()?,
            sliding: has(LayerKind::Sliding)
                .then(|| tables(LayerKind::Sliding))
                .transpose()?,
        };
        Ok(Prepared {
            x,
            pass,
            cache,
            new_mask,
            batch,
            seq,
        })
    }

    /// Token embeddings `[batch, seq, hidden]` for `ids: [batch, seq]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?;
        let hidden = self.config.hidden_size;
        if let Some(rows) = self
            .embed_override
            .as_ref()
            .map(|o| o.lookup(&ids))
            .transpose()?
            .flatten()
        {
            return Ok(rows.to_dtype(self.dtype())?.reshape((b, t, hidden))?);
        }
        Ok(self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, t, hidden))?)
    }

    /// The output head when it is a plain frozen projection (no adapter on it, no bias):
    /// losses can then fuse the head into the cross-entropy. Its dense weight `[vocab, hidden]`
    /// (a quantized head dequantized, transiently: the caller drops it after the loss), and
    /// for a `training` batch when the base's projections are quantized and train on integer
    /// products ([`peft_kernels::q8_gemm::integer_products`]), the head on integer products
    /// too (an evaluation, like the layers', keeps the f32 products and leaves kept ones be).
    pub fn frozen_head(&self, training: bool) -> Option<FrozenHead> {
        let head = self.lm_head.as_any().downcast_ref::<FrozenLinear>()?;
        if head.bias().is_some() {
            return None;
        }
        let weight = match head.frozen_weight() {
            FrozenWeight::Dense(w) => w.clone(),
            FrozenWeight::Quantized(q) => q.dequantize().ok()?,
        };
        let wanted = peft_kernels::q8_gemm::integer_products() && self.base_is_quantized();
        let int8 = self
            .head_int8
            .products(head.frozen_weight(), &weight, wanted, training);
        Some(FrozenHead { weight, int8 })
    }

    /// Whether the head's integer products are kept (see [`frozen_head`](Self::frozen_head)).
    pub fn holds_integer_head(&self) -> bool {
        self.head_int8.holds()
    }

    /// Drops the head's integer products, if kept (rebuilt at the next training batch).
    pub fn release_integer_head(&self) {
        self.head_int8.release()
    }

    /// Whether any of the layers' projections holds a quantized base weight.
    fn base_is_quantized(&self) -> bool {
        self.linear_paths()
            .iter()
            .filter(|p| *p != "lm_head")
            .filter_map(|p| self.linear(p).ok())
            .any(|l| l.base().is_quantized())
    }

    /// A fresh cache for decoding with this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.config.cache_window())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Changes the attention window (`None`: plain causal), e.g. to run a Mistral checkpoint
    /// the way a GGUF runtime does. Only the masks depend on it.
    pub fn set_sliding_window(&mut self, window: Option<usize>) {
        self.config.sliding_window = window;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.kind = self.config.layer_kind(i);
        }
    }

    /// Gemma's embedding multiplier `sqrt(hidden_size)`, rounded to the model's dtype.
    fn embedding_scale(&self) -> Result<f64> {
        let scale = (self.config.hidden_size as f64).sqrt();
        Ok(Tensor::new(scale, &Device::Cpu)?
            .to_dtype(self.dtype())?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    pub fn layers_mut(&mut self) -> &mut [DecoderLayer] {
        &mut self.layers
    }

    pub fn final_norm(&self) -> &RmsNorm {
        &self.norm
    }

    pub(crate) fn lm_head(&self) -> &dyn Linear {
        self.lm_head.as_ref()
    }

    pub(crate) fn lm_head_mut(&mut self) -> &mut Box<dyn Linear> {
        &mut self.lm_head
    }

    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Replaces the token embedding table (e.g. by a trainable copy for `modules_to_save`).
    /// Unlike the constructor this does not detach: a `Var`'s tensor stays trainable.
    pub fn set_embed_tokens(&mut self, table: Tensor) -> Result<()> {
        if table.dims() != self.embed_tokens.dims() {
            return Err(Error::InvalidArgument(format!(
                "embedding table has shape {:?}, expected {:?}",
                table.dims(),
                self.embed_tokens.dims()
            )));
        }
        self.embed_tokens = table;
        Ok(())
    }

    /// Installs (or removes) a replacement of the token-embedding lookup.
    pub fn set_embed_override(&mut self, o: Option<Box<dyn TokenEmbedding>>) {
        self.embed_override = o;
    }

    pub fn embed_override(&self) -> Option<&dyn TokenEmbedding> {
        self.embed_override.as_deref()
    }

    pub fn embed_override_mut(&mut self) -> Option<&mut Box<dyn TokenEmbedding>> {
        self.embed_override.as_mut()
    }

    /// Number of parameters of the base model (embeddings, norms, projections, head).
    pub fn num_parameters(&self) -> usize {
        let c = &self.config;
        let norms: usize = self
            .layers
            .iter()
            .flat_map(|l| {
                let a = &l.self_attn;
                [
                    Some(&l.input_layernorm),
                    Some(&l.post_attention_layernorm),
                    l.pre_feedforward_layernorm.as_ref(),
                    l.post_feedforward_layernorm.as_ref(),
                    a.q_norm.as_ref(),
                    a.k_norm.as_ref(),
                ]
            })
            .flatten()
            .map(|n| n.weight().elem_count())
            .sum::<usize>()
            + c.hidden_size;
        let linears: usize = self
            .linear_paths()
            .iter()
            .filter(|p| *p != "lm_head" || !c.tie_word_embeddings)
            .filter_map(|p| self.linear(p).ok())
            .map(|l| l.base().num_params())
            .sum();
        self.embed_tokens.elem_count() + norms + linears
    }
}

#[cfg(test)]
#[path = "decoder_tests.rs"]
mod tests;
