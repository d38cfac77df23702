//! The Mistral/Llama decoder: token embedding, pre-norm blocks of grouped-query attention and a
//! SwiGLU MLP, final norm, tied or untied head. Logits for every position; every op
//! differentiable; every projection reachable by its Hugging Face module path.

use candle_core::{DType, Device, Tensor, D};

use super::cache::KvCache;
use super::config::ModelConfig;
use super::linear::{FrozenLinear, Linear};
use super::norm::RmsNorm;
use super::rope::Rope;
use crate::error::{Error, Result};

/// The seven projections of a decoder block, by their Hugging Face names.
pub const ATTENTION_PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
pub const MLP_PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Box<dyn Linear>,
    pub k_proj: Box<dyn Linear>,
    pub v_proj: Box<dyn Linear>,
    pub o_proj: Box<dyn Linear>,
}

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Box<dyn Linear>,
    pub up_proj: Box<dyn Linear>,
    pub down_proj: Box<dyn Linear>,
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))`, the middle fused into the down projection.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward_swiglu(&gate, &up)
    }

    /// `residual + forward(norm(residual))` as one op when all three projections are plain
    /// LoRA products over f32 bases on the CPU (`peft_kernels::lora_mlp`: keeps neither the
    /// normed input nor the down projection's output for the backward, and over 8-bit
    /// integer bases keeps the gate and up activations as 8-bit blocks). `None`: compose.
    pub fn forward_block(&self, residual: &Tensor, norm: &RmsNorm) -> Result<Option<Tensor>> {
        let hidden = residual.dim(D::Minus1)?;
        let rows = residual.elem_count() / hidden.max(1);
        if residual.dtype() != DType::F32 || !residual.device().is_cpu() {
            return Ok(None);
        }
        let (Some(g), Some(u), Some(d)) = (
            self.gate_proj.fused_lora(rows),
            self.up_proj.fused_lora(rows),
            self.down_proj.fused_lora(rows),
        ) else {
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

/// A module that adjusts a block's output given its input (bottleneck adapters hook in here).
pub trait BlockAdapter: Send + Sync + std::fmt::Debug {
    /// `input`: what the block (attention or MLP) received, after its norm; `output`: what
    /// the block produced, before the residual add. Returns the adjusted output.
    fn forward(&self, input: &Tensor, output: &Tensor) -> Result<Tensor>;
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
    /// Applied to the attention block's output.
    pub attn_adapter: Option<Box<dyn BlockAdapter>>,
    /// Applied to the MLP block's output.
    pub mlp_adapter: Option<Box<dyn BlockAdapter>>,
}

/// What one forward pass takes besides the model. Build with [`Forward::ids`] or
/// [`Forward::embeds`] and the `with_*` methods.
pub struct Forward<'a> {
    pub(crate) input: Input<'a>,
    pub(crate) attention_mask: Option<&'a Tensor>,
    pub(crate) position_ids: Option<&'a Tensor>,
    pub(crate) segment_ids: Option<&'a Tensor>,
    pub(crate) cache: Option<&'a mut KvCache>,
}

pub(crate) enum Input<'a> {
    Ids(&'a Tensor),
    Embeds(&'a Tensor),
}

impl<'a> Forward<'a> {
    /// `ids: [batch, seq]` (u32 or i64).
    pub fn ids(ids: &'a Tensor) -> Self {
        Forward {
            input: Input::Ids(ids),
            attention_mask: None,
            position_ids: None,
            segment_ids: None,
            cache: None,
        }
    }

    /// `embeds: [batch, seq, hidden]` (prompt tuning feeds virtual tokens this way).
    pub fn embeds(embeds: &'a Tensor) -> Self {
        Forward {
            input: Input::Embeds(embeds),
            attention_mask: None,
            position_ids: None,
            segment_ids: None,
            cache: None,
        }
    }

    /// `[batch, seq]`, 1 = real token, 0 = padding (covers the new tokens only; the cache
    /// remembers the padding of earlier ones).
    pub fn with_attention_mask(mut self, mask: &'a Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// `[batch, seq]` RoPE positions; default: the tokens' slots (`cache.seen() + t`).
    pub fn with_position_ids(mut self, positions: &'a Tensor) -> Self {
        self.position_ids = Some(positions);
        self
    }

    /// `[batch, seq]` example index of each token in a packed sequence: a token attends only
    /// to earlier tokens of its own example. Not combinable with a cache.
    pub fn with_segment_ids(mut self, segments: &'a Tensor) -> Self {
        self.segment_ids = Some(segments);
        self
    }

    /// Reads earlier keys/values (or prefix-tuning prefixes) from the cache and appends the new ones.
    pub fn with_cache(mut self, cache: &'a mut KvCache) -> Self {
        self.cache = Some(cache);
        self
    }
}

/// A replacement for the token-embedding lookup (PEFT's `modules_to_save` trains a copy of
/// the table per adapter).
pub trait TokenEmbedding: Send + Sync + std::fmt::Debug {
    /// Rows for `ids` (flat u32), `[n, hidden]`; `None` to use the model's own table.
    fn lookup(&self, ids: &Tensor) -> Result<Option<Tensor>>;
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
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
    rope: Rope,
    device: Device,
}

/// Which layers a layer-by-layer forward recomputes in the backward (keeping only their
/// input) instead of keeping their graph (freed layer by layer during the backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// Every layer keeps its graph: no recomputation, the most memory.
    #[default]
    Off,
    /// Every layer is recomputed: one layer's activations at a time, one extra forward.
    All,
    /// The first `n` layers are recomputed, the others kept: memory and time in between,
    /// about `n / layers` of the way from `Off` to `All` (the first layers' graphs are the
    /// ones that would be kept longest).
    FirstLayers(usize),
}

impl From<bool> for Checkpointing {
    fn from(on: bool) -> Self {
        if on {
            Checkpointing::All
        } else {
            Checkpointing::Off
        }
    }
}

impl Checkpointing {
    fn recomputes(self, layer: usize) -> bool {
        match self {
            Checkpointing::Off => false,
            Checkpointing::All => true,
            Checkpointing::FirstLayers(n) => layer < n,
        }
    }
}

/// A forward pass that kept only each layer's input (see
/// [`Model::hidden_states_checkpointed`]).
pub struct Checkpointed {
    /// Final-norm hidden states `[batch, seq, hidden]`; their graph starts at the last
    /// layer's output.
    pub hidden: Tensor,
    top: candle_core::Var,
    /// The embedded input, with its graph (prompt or embedding adapters get gradients).
    embedded: Tensor,
    inputs: Vec<Tensor>,
    /// For each layer whose graph was kept: its input leaf and output, with its graph.
    kept: Vec<Option<(candle_core::Var, Tensor)>>,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
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
    /// q, k, v, o, gate, up, down, each `[out, in]` (dense or quantized).
    pub projections: [FrozenLinear; 7],
}

impl Model {
    pub fn new(config: ModelConfig, weights: ModelWeights) -> Result<Self> {
        crate::threads::settle_thread_count();
        let device = weights.embed_tokens.device().clone();
        let eps = config.rms_norm_eps;
        let layers = weights
            .layers
            .into_iter()
            .map(|l| {
                let [q, k, v, o, gate, up, down] =
                    l.projections.map(|w| -> Box<dyn Linear> { Box::new(w) });
                DecoderLayer {
                    input_layernorm: RmsNorm::new(l.input_layernorm, eps),
                    self_attn: Attention {
                        q_proj: q,
                        k_proj: k,
                        v_proj: v,
                        o_proj: o,
                    },
                    post_attention_layernorm: RmsNorm::new(l.post_attention_layernorm, eps),
                    mlp: Mlp {
                        gate_proj: gate,
                        up_proj: up,
                        down_proj: down,
                    },
                    attn_adapter: None,
                    mlp_adapter: None,
                }
            })
            .collect();
        let lm_head = weights
            .lm_head
            .unwrap_or_else(|| weights.embed_tokens.clone());
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            config.max_position_embeddings,
            &device,
        )?;
        Ok(Model {
            embed_tokens: weights.embed_tokens.detach(),
            embed_override: None,
            layers,
            norm: RmsNorm::new(weights.norm, eps),
            lm_head: Box::new(FrozenLinear::new(lm_head, None)),
            rope,
            device,
            config,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Changes the attention window (`None`: plain causal), e.g. to run a Mistral checkpoint
    /// the way a GGUF runtime does. Only the masks depend on it.
    pub fn set_sliding_window(&mut self, window: Option<usize>) {
        self.config.sliding_window = window;
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
        let norms = (2 * self.layers.len() + 1) * c.hidden_size;
        let linears: usize = self
            .linear_paths()
            .iter()
            .filter(|p| *p != "lm_head" || !c.tie_word_embeddings)
            .filter_map(|p| self.linear(p).ok())
            .map(|l| l.base().num_params())
            .sum();
        self.embed_tokens.elem_count() + norms + linears
    }

    pub fn final_norm(&self) -> &RmsNorm {
        &self.norm
    }

    /// Hugging Face module paths of every linear layer, in checkpoint order
    /// (`model.layers.0.self_attn.q_proj`, …, `lm_head`).
    pub fn linear_paths(&self) -> Vec<String> {
        let mut paths = Vec::with_capacity(self.layers.len() * 7 + 1);
        for i in 0..self.layers.len() {
            paths.extend(
                ATTENTION_PROJECTIONS
                    .iter()
                    .map(|n| format!("model.layers.{i}.self_attn.{n}")),
            );
            paths.extend(
                MLP_PROJECTIONS
                    .iter()
                    .map(|n| format!("model.layers.{i}.mlp.{n}")),
            );
        }
        paths.push("lm_head".to_string());
        paths
    }

    /// The linear layer at a Hugging Face module path.
    pub fn linear(&self, path: &str) -> Result<&dyn Linear> {
        self.slot(path).ok_or_else(|| self.unknown_module(path))
    }

    /// Replaces the linear layer at `path` by `f(old)`; on error the old layer stays.
    pub fn replace_linear(
        &mut self,
        path: &str,
        f: impl FnOnce(
            Box<dyn Linear>,
        ) -> std::result::Result<Box<dyn Linear>, (Box<dyn Linear>, Error)>,
    ) -> Result<()> {
        let err = self.unknown_module(path);
        let slot = self.slot_mut(path).ok_or(err)?;
        let placeholder: Box<dyn Linear> = Box::new(FrozenLinear::new(
            Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?,
            None,
        ));
        let old = std::mem::replace(slot, placeholder);
        match f(old) {
            Ok(new) => {
                *slot = new;
                Ok(())
            }
            Err((old, e)) => {
                *slot = old;
                Err(e)
            }
        }
    }

    fn slot(&self, path: &str) -> Option<&dyn Linear> {
        let (layer, name) = match parse_linear_path(path)? {
            LinearPath::Head => return Some(self.lm_head.as_ref()),
            LinearPath::Layer(i, name) => (self.layers.get(i)?, name),
        };
        Some(match name {
            "q_proj" => layer.self_attn.q_proj.as_ref(),
            "k_proj" => layer.self_attn.k_proj.as_ref(),
            "v_proj" => layer.self_attn.v_proj.as_ref(),
            "o_proj" => layer.self_attn.o_proj.as_ref(),
            "gate_proj" => layer.mlp.gate_proj.as_ref(),
            "up_proj" => layer.mlp.up_proj.as_ref(),
            "down_proj" => layer.mlp.down_proj.as_ref(),
            _ => return None,
        })
    }

    fn slot_mut(&mut self, path: &str) -> Option<&mut Box<dyn Linear>> {
        let (layer, name) = match parse_linear_path(path)? {
            LinearPath::Head => return Some(&mut self.lm_head),
            LinearPath::Layer(i, name) => (self.layers.get_mut(i)?, name),
        };
        Some(match name {
            "q_proj" => &mut layer.self_attn.q_proj,
            "k_proj" => &mut layer.self_attn.k_proj,
            "v_proj" => &mut layer.self_attn.v_proj,
            "o_proj" => &mut layer.self_attn.o_proj,
            "gate_proj" => &mut layer.mlp.gate_proj,
            "up_proj" => &mut layer.mlp.up_proj,
            "down_proj" => &mut layer.mlp.down_proj,
            _ => return None,
        })
    }

    /// An `UnknownModule` error listing the paths closest to `path`.
    pub fn unknown_module(&self, path: &str) -> Error {
        let mut scored: Vec<(usize, String)> = self
            .linear_paths()
            .into_iter()
            .map(|p| (edit_distance(path, &p), p))
            .collect();
        scored.sort();
        let best = scored.first().map_or(0, |s| s.0);
        Error::UnknownModule {
            name: path.to_string(),
            close_matches: scored
                .into_iter()
                .take_while(|(d, _)| *d <= best.max(2) && *d <= path.len() / 2 + 1)
                .take(5)
                .map(|(_, p)| p)
                .collect(),
        }
    }

    /// A fresh cache for decoding with this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.config.sliding_window)
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

    /// Logits `[batch, seq, vocab]` for every position of `ids: [batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(Forward::ids(ids))
    }

    /// The general forward pass (see [`Forward`]).
    pub fn forward_with(&self, args: Forward<'_>) -> Result<Tensor> {
        let hidden = self.hidden_states(args)?;
        self.lm_head.forward(&hidden)
    }

    /// Logits `[batch, vocab]` of the last position only (what decoding needs; the head runs
    /// on one position instead of all).
    pub fn forward_last(&self, args: Forward<'_>) -> Result<Tensor> {
        let hidden = self.hidden_states(args)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.lm_head.forward(&last)
    }

    /// The output head's dense weight `[vocab, hidden]` when the head is a plain frozen
    /// projection (no adapter on it): losses can then fuse the head into the cross-entropy. A
    /// quantized head is dequantized (transiently: the caller drops it after the loss).
    pub fn frozen_head_weight(&self) -> Option<Tensor> {
        let head = self.lm_head.as_any().downcast_ref::<FrozenLinear>()?;
        if head.bias().is_some() {
            return None;
        }
        match head.frozen_weight() {
            super::linear::FrozenWeight::Dense(w) => Some(w.clone()),
            super::linear::FrozenWeight::Quantized(q) => q.dequantize().ok(),
        }
    }

    /// Final-norm hidden states `[batch, seq, hidden]` (what the head is applied to).
    pub fn hidden_states(&self, args: Forward<'_>) -> Result<Tensor> {
        Ok(self.run_layers(args, None)?.0)
    }

    /// [`hidden_states`](Self::hidden_states) with gradient checkpointing: each layer runs
    /// without keeping its activations (only its input, `[batch, seq, hidden]`, is kept), and
    /// [`backward_checkpointed`](Self::backward_checkpointed) recomputes them one layer at a
    /// time. Peak memory drops from every layer's activations to one layer's, for one extra
    /// forward pass. Not with a KV cache.
    pub fn hidden_states_checkpointed(&self, args: Forward<'_>) -> Result<Checkpointed> {
        self.hidden_states_layered(args, Checkpointing::All)
    }

    /// [`hidden_states`](Self::hidden_states) with one graph per layer, for
    /// [`backward_checkpointed`](Self::backward_checkpointed): nothing is recomputed, but
    /// each layer's activations are freed as soon as its backward is done, instead of all of
    /// them at the end (candle's backward keeps the whole graph alive until it returns).
    pub fn hidden_states_segmented(&self, args: Forward<'_>) -> Result<Checkpointed> {
        self.hidden_states_layered(args, Checkpointing::Off)
    }

    /// The layer-by-layer forward for
    /// [`backward_checkpointed`](Self::backward_checkpointed), recomputing the layers
    /// `checkpointing` names and keeping the others' graphs.
    pub fn hidden_states_layered(
        &self,
        args: Forward<'_>,
        checkpointing: Checkpointing,
    ) -> Result<Checkpointed> {
        let (_, ck) = self.run_layers(args, Some(checkpointing))?;
        Ok(ck.expect("run_layers keeps the checkpoints when asked"))
    }

    /// The gradients of `loss` (a scalar computed from `ck.hidden`) for `vars`, recomputing
    /// every layer's activations from its kept input, last layer first.
    pub fn backward_checkpointed(
        &self,
        ck: Checkpointed,
        loss: &Tensor,
        vars: &[candle_core::Var],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        // candle leaves the gradients of leaves attached to the graph that made them (which
        // references the forward activations): detach, or every recomputed layer stays alive
        // and the next layer's backward walks through it again.
        let add = |grads: &mut Vec<Option<Tensor>>, store: &candle_core::backprop::GradStore| {
            for (slot, var) in grads.iter_mut().zip(vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?.detach(),
                        None => g.detach(),
                    });
                }
            }
            Ok::<_, Error>(())
        };
        let top = loss.backward()?;
        add(&mut grads, &top)?;
        let Some(mut g) = top.get(ck.top.as_tensor()).map(Tensor::detach) else {
            return Ok(grads);
        };
        drop(top);
        let mut kept = ck.kept;
        for (i, input) in ck.inputs.iter().enumerate().rev() {
            let (x, y) = match kept.get_mut(i).and_then(Option::take) {
                // This layer's graph was kept; it is dropped after its backward.
                Some(pair) => pair,
                None => {
                    let x = candle_core::Var::from_tensor(input)?;
                    let y = self.layer_forward(
                        i,
                        &self.layers[i],
                        x.as_tensor(),
                        &ck.cos,
                        &ck.sin,
                        ck.mask.as_ref(),
                        None,
                    )?;
                    (x, y)
                }
            };
            // d/dy of sum(y ⊙ g) is g: the layer's backward with the incoming gradient.
            let store = (y * &g)?.sum_all()?.backward()?;
            add(&mut grads, &store)?;
            g = store
                .get(x.as_tensor())
                .map(Tensor::detach)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("layer {i}: no gradient reached its input"))
                })?;
        }
        if ck.embedded.track_op() {
            let store = (&ck.embedded * &g)?.sum_all()?.backward()?;
            add(&mut grads, &store)?;
        }
        Ok(grads)
    }

    fn run_layers(
        &self,
        args: Forward<'_>,
        checkpoint: Option<Checkpointing>,
    ) -> Result<(Tensor, Option<Checkpointed>)> {
        if args.cache.is_some() && rayon::current_thread_index().is_none() {
            // Decoding: run the pass on a pool worker, so every parallel loop inside (hundreds
            // per token) joins from within the pool instead of waking the workers from outside
            // and putting this thread to sleep (a third of decoding time). Not for training:
            // activations allocated on a worker and freed on this thread grow a second malloc
            // arena (peak RSS 2.9 -> 4.5 GB on SmolLM2).
            return rayon::scope(|_| self.run_layers(args, checkpoint));
        }
        let Forward {
            input,
            attention_mask,
            position_ids,
            segment_ids,
            mut cache,
        } = args;
        let mut x = match input {
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
        let (batch, seq, _) = x.dims3()?;
        if seq == 0 {
            return Err(Error::InvalidArgument("empty input sequence".into()));
        }
        let past = cache.as_deref().map_or(0, |c| c.seen());
        let new_mask = attention_mask
            .map(|m| mask_rows(m, batch, seq))
            .transpose()?;
        if segment_ids.is_some() && cache.as_deref().is_some_and(|c| c.seen() > 0) {
            return Err(Error::InvalidArgument(
                "segment ids (packed sequences) cannot be combined with a filled cache".into(),
            ));
        }
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
        let (cos, sin) = self.rope.tables(&positions)?;
        let mask = attention_bias(
            &AttentionLayout {
                batch,
                seq,
                cache_start: cache.as_deref().map_or(0, |c| c.start()),
                past,
                window: self.config.sliding_window,
                cached_key_mask: cache.as_deref().and_then(|c| c.key_mask()),
                new_key_mask: new_mask.as_ref(),
                segments: segments.as_ref(),
            },
            &self.device,
        )?;
        if let Some(checkpointing) = checkpoint {
            if cache.is_some() {
                return Err(Error::InvalidArgument(
                    "gradient checkpointing cannot be combined with a KV cache".into(),
                ));
            }
            let embedded = x;
            let mut inputs = Vec::with_capacity(self.layers.len());
            let mut kept = Vec::with_capacity(self.layers.len());
            let mut x = embedded.detach();
            for (i, layer) in self.layers.iter().enumerate() {
                inputs.push(x.clone());
                x = match checkpointing.recomputes(i) {
                    // The graph built here is dropped with `detach`: only the output is kept.
                    true => {
                        kept.push(None);
                        self.layer_forward(i, layer, &x, &cos, &sin, mask.as_ref(), None)?
                            .detach()
                    }
                    false => {
                        let leaf = candle_core::Var::from_tensor(&x)?;
                        let y = self.layer_forward(
                            i,
                            layer,
                            leaf.as_tensor(),
                            &cos,
                            &sin,
                            mask.as_ref(),
                            None,
                        )?;
                        let next = y.detach();
                        kept.push(Some((leaf, y)));
                        next
                    }
                };
            }
            let top = candle_core::Var::from_tensor(&x)?;
            let hidden = self.norm.forward(top.as_tensor())?;
            return Ok((
                hidden.clone(),
                Some(Checkpointed {
                    hidden,
                    top,
                    embedded,
                    inputs,
                    kept,
                    cos,
                    sin,
                    mask,
                }),
            ));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(
                i,
                layer,
                &x,
                &cos,
                &sin,
                mask.as_ref(),
                cache.as_deref_mut(),
            )?;
        }
        if let Some(c) = cache {
            c.commit(seq, new_mask, batch)?;
        }
        Ok((self.norm.forward(&x)?, None))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        index: usize,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        // Without a cache or a block adapter, q, k and v come from one op that keeps neither
        // the normed input nor the unrotated projections (`peft_kernels::lora_qkv`).
        let fused = match (&cache, &layer.attn_adapter) {
            (None, None) => self.fused_qkv(layer, x, cos, sin)?,
            _ => None,
        };
        let (heads, h) = match fused {
            Some((q, k, v)) => (self.attend(index, q, k, v, mask, None)?, None),
            None => {
                let h = layer.input_layernorm.forward(x)?;
                let heads = self.attention(index, &layer.self_attn, &h, cos, sin, mask, cache)?;
                (heads, Some(h))
            }
        };
        let o_proj = &layer.self_attn.o_proj;
        let onto_stream = match &layer.attn_adapter {
            None if x.dtype() == DType::F32 && x.device().is_cpu() => {
                o_proj.fused_lora(heads.elem_count() / heads.dim(D::Minus1)?.max(1))
            }
            _ => None,
        };
        let x = match onto_stream {
            // The output projection added onto the stream in one op: its output is not kept.
            Some(p) => peft_kernels::lora_linear_residual(&heads, x, &p)?,
            None => {
                let mut attn = o_proj.forward(&heads)?;
                if let (Some(adapter), Some(h)) = (&layer.attn_adapter, &h) {
                    attn = adapter.forward(h, &attn)?;
                }
                (x + attn)?
            }
        };
        if layer.mlp_adapter.is_none() {
            if let Some(y) = layer
                .mlp
                .forward_block(&x, &layer.post_attention_layernorm)?
            {
                return Ok(y);
            }
        }
        let h = layer.post_attention_layernorm.forward(&x)?;
        let mut mlp = layer.mlp.forward(&h)?;
        if let Some(adapter) = &layer.mlp_adapter {
            mlp = adapter.forward(&h, &mlp)?;
        }
        Ok((&x + mlp)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        index: usize,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let q = attn
            .q_proj
            .forward(x)?
            .reshape((b, t, heads, d))?
            .transpose(1, 2)?;
        let k = attn
            .k_proj
            .forward(x)?
            .reshape((b, t, kv_heads, d))?
            .transpose(1, 2)?;
        let v = attn
            .v_proj
            .forward(x)?
            .reshape((b, t, kv_heads, d))?
            .transpose(1, 2)?;
        // The fused RoPE reads the transposed views directly and returns contiguous tensors.
        let q = Rope::apply(&q, cos, sin)?;
        let k = Rope::apply(&k, cos, sin)?;
        let v = v.contiguous()?;
        self.attend(index, q, k, v, mask, cache)
    }

    /// q, k, v of one layer as a fused op when every projection is a plain LoRA product over
    /// an f32 base on the CPU; `None`: compose.
    fn fused_qkv(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        if x.dtype() != DType::F32 || !x.device().is_cpu() || x.rank() != 3 {
            return Ok(None);
        }
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let a = &layer.self_attn;
        let (Some(q), Some(k), Some(v)) = (
            a.q_proj.fused_lora(rows),
            a.k_proj.fused_lora(rows),
            a.v_proj.fused_lora(rows),
        ) else {
            return Ok(None);
        };
        let c = &self.config;
        let norm = &layer.input_layernorm;
        Ok(Some(peft_kernels::lora_qkv::lora_qkv(
            x,
            (norm.weight(), norm.eps()),
            [&q, &k, &v],
            peft_kernels::lora_qkv::HeadShape {
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            },
            (cos, sin),
        )?))
    }

    /// Attention over heads-first `q: [b, heads, t, d]`, `k`, `v: [b, kv_heads, t, d]`
    /// (appended to the cache first, if any): `[b, t, heads · d]`.
    fn attend(
        &self,
        index: usize,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, _, t, d) = q.dims4()?;
        let kv_heads = c.num_key_value_heads;
        let (k, v) = match cache {
            Some(cache) => cache.append(index, k, v)?,
            None => (k, v),
        };
        // Grouped-query attention without copying K/V: query head h uses kv head h / groups
        // (repeat_interleave), so view q as [b, kv_heads, groups * t, d].
        let groups = c.kv_groups();
        let q = q.reshape((b, kv_heads, groups * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        // Keeps q, k, v, the output and one log-sum-exp per query for the backward, not the
        // [queries, keys] scores and probabilities.
        // [b, t, heads · d], the layout o_proj reads (the caller applies it).
        Ok(peft_kernels::attention::attention(
            &q, &k, &v, mask, groups, scale,
        )?)
    }
}

enum LinearPath<'a> {
    Head,
    Layer(usize, &'a str),
}

fn parse_linear_path(path: &str) -> Option<LinearPath<'_>> {
    if path == "lm_head" {
        return Some(LinearPath::Head);
    }
    let rest = path.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let name = rest
        .strip_prefix("self_attn.")
        .filter(|n| ATTENTION_PROJECTIONS.contains(n))
        .or_else(|| {
            rest.strip_prefix("mlp.")
                .filter(|n| MLP_PROJECTIONS.contains(n))
        })?;
    Some(LinearPath::Layer(index, name))
}

/// Levenshtein distance (for "did you mean" suggestions).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Where the new tokens sit relative to the cached keys, for building the attention bias.
struct AttentionLayout<'a> {
    batch: usize,
    seq: usize,
    cache_start: usize,
    past: usize,
    window: Option<usize>,
    cached_key_mask: Option<&'a Vec<Vec<f32>>>,
    new_key_mask: Option<&'a Vec<Vec<f32>>>,
    /// Example index per new token (packed sequences).
    segments: Option<&'a Vec<Vec<u32>>>,
}

/// The additive attention bias `[batch or 1, 1, seq, keys]`: 0 where a query may attend,
/// `f32::MIN` elsewhere (a finite value, as transformers uses: an all-masked padding row then
/// stays finite instead of turning into NaN). `None` when every query sees every key.
fn attention_bias(l: &AttentionLayout<'_>, device: &Device) -> Result<Option<Tensor>> {
    let kept = l.past - l.cache_start;
    let keys = kept + l.seq;
    let padded = l.cached_key_mask.is_some() || l.new_key_mask.is_some() || l.segments.is_some();
    let visible = |q_slot: usize, k_slot: usize| {
        k_slot <= q_slot && l.window.is_none_or(|w| k_slot + w > q_slot)
    };
    let everything_visible = !padded
        && (0..l.seq).all(|t| {
            let q = l.past + t;
            visible(q, l.cache_start) && visible(q, l.cache_start + keys - 1)
        });
    if everything_visible {
        return Ok(None);
    }
    let rows = if padded { l.batch } else { 1 };
    let mut bias = vec![0f32; rows * l.seq * keys];
    for b in 0..rows {
        let key_real = |j: usize| -> bool {
            if j < kept {
                l.cached_key_mask.is_none_or(|m| m[b][j] > 0.5)
            } else {
                l.new_key_mask.is_none_or(|m| m[b][j - kept] > 0.5)
            }
        };
        let same_segment = |t: usize, j: usize| -> bool {
            match l.segments {
                // Cached keys (a prefix) are visible to every segment.
                Some(s) if j >= kept => s[b][t] == s[b][j - kept],
                _ => true,
            }
        };
        for t in 0..l.seq {
            let q_slot = l.past + t;
            let row = &mut bias[(b * l.seq + t) * keys..][..keys];
            for (j, v) in row.iter_mut().enumerate() {
                if !(visible(q_slot, l.cache_start + j) && key_real(j) && same_segment(t, j)) {
                    *v = f32::MIN;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(
        bias,
        (rows, 1, l.seq, keys),
        device,
    )?))
}

/// Segment ids `[batch, seq]` as host rows.
fn segment_rows(segments: &Tensor, batch: usize, seq: usize) -> Result<Vec<Vec<u32>>> {
    if segments.dims() != [batch, seq] {
        return Err(Error::InvalidArgument(format!(
            "segment_ids has shape {:?}, expected [{batch}, {seq}]",
            segments.dims()
        )));
    }
    Ok(segments.to_dtype(DType::U32)?.to_vec2::<u32>()?)
}

/// An attention mask tensor `[batch, seq]` as host rows of 0.0 / 1.0.
fn mask_rows(mask: &Tensor, batch: usize, seq: usize) -> Result<Vec<Vec<f32>>> {
    if mask.dims() != [batch, seq] {
        return Err(Error::InvalidArgument(format!(
            "attention_mask has shape {:?}, expected [{batch}, {seq}]",
            mask.dims()
        )));
    }
    Ok(mask.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

impl ModelWeights {
    /// Random weights in the fixtures' style (norms `1 + 0.1·N`, the rest `N(0, std²)`), for
    /// tests and synthetic benchmarks.
    pub fn random(config: &ModelConfig, std: f64, dtype: DType, device: &Device) -> Result<Self> {
        let c = config;
        let randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?)
        };
        let norm = |n: usize| -> Result<Tensor> {
            Ok((Tensor::randn(0f32, 0.1, n, device)? + 1.0)?.to_dtype(dtype)?)
        };
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                Ok(LayerWeights {
                    input_layernorm: norm(h)?,
                    post_attention_layernorm: norm(h)?,
                    projections: [
                        randn(&[q_out, h])?,
                        randn(&[kv_out, h])?,
                        randn(&[kv_out, h])?,
                        randn(&[h, q_out])?,
                        randn(&[i, h])?,
                        randn(&[i, h])?,
                        randn(&[h, i])?,
                    ]
                    .map(|w| FrozenLinear::new(w, None)),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            embed_tokens: randn(&[c.vocab_size, h])?,
            layers,
            norm: norm(h)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(randn(&[c.vocab_size, h])?)
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;
    use candle_core::Var;

    fn tiny_config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Mistral,
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            max_position_embeddings: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            sliding_window: Some(4),
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: vec![2],
        }
    }

    fn tiny_model() -> Model {
        let config = tiny_config();
        let weights = ModelWeights::random(&config, 0.3, DType::F64, &Device::Cpu).unwrap();
        Model::new(config, weights).unwrap()
    }

    /// `sum(f(x) * c)` and its gradient at `x`, by autograd.
    fn loss_and_grad(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, c: &Tensor) -> (f64, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let loss = (f(v.as_tensor()) * c).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(v.as_tensor())
            .expect("a gradient reaches the input")
            .clone();
        (loss.to_scalar::<f64>().unwrap(), g)
    }

    /// Central differences on every coordinate of a small `x`.
    fn check_against_finite_differences(name: &str, f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor) {
        let c = Tensor::randn(0f64, 1., f(x).shape(), x.device()).unwrap();
        let (_, g) = loss_and_grad(f, x, &c);
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-5;
        let loss_at = |v: &[f64]| -> f64 {
            let t = Tensor::from_slice(v, x.shape(), x.device()).unwrap();
            (f(&t) * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let mut worst = 0f64;
        for i in 0..xs.len() {
            let mut plus = xs.clone();
            plus[i] += eps;
            let mut minus = xs.clone();
            minus[i] -= eps;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps);
            worst = worst.max((numeric - g[i]).abs() / (1.0 + numeric.abs()));
        }
        assert!(
            worst < 1e-6,
            "{name}: autograd and finite differences differ by {worst}"
        );
    }

    #[test]
    fn gradient_reaches_the_input_of_every_layer_exactly() {
        let model = tiny_model();
        let (b, t, h) = (2, 6, model.config.hidden_size);
        let positions =
            Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &Device::Cpu).unwrap();
        let (cos, sin) = model.rope.tables(&positions).unwrap();
        let layout = AttentionLayout {
            batch: b,
            seq: t,
            cache_start: 0,
            past: 0,
            window: model.config.sliding_window,
            cached_key_mask: None,
            new_key_mask: None,
            segments: None,
        };
        let mask = attention_bias(&layout, &Device::Cpu).unwrap();
        assert!(mask.is_some(), "6 tokens with a window of 4 need a mask");
        let mask = mask.map(|m| m.to_dtype(DType::F64).unwrap());
        for (i, layer) in model.layers.iter().enumerate() {
            let x = Tensor::randn(0f64, 1., (b, t, h), &Device::Cpu).unwrap();
            let f = |x: &Tensor| {
                model
                    .layer_forward(i, layer, x, &cos, &sin, mask.as_ref(), None)
                    .unwrap()
            };
            check_against_finite_differences(&format!("layer {i}"), &f, &x);
        }
        // The final norm and the head, and the whole model from its input embeddings.
        let x = Tensor::randn(0f64, 1., (1, 3, h), &Device::Cpu).unwrap();
        check_against_finite_differences(
            "final norm + lm_head",
            &|x: &Tensor| {
                model
                    .lm_head
                    .forward(&model.norm.forward(x).unwrap())
                    .unwrap()
            },
            &x,
        );
        check_against_finite_differences(
            "whole model",
            &|x: &Tensor| model.forward_with(Forward::embeds(x)).unwrap(),
            &x,
        );
    }

    #[test]
    fn ids_and_embeddings_give_the_same_logits() {
        let model = tiny_model();
        let ids = Tensor::new(&[[3u32, 7, 1, 9, 4]], &Device::Cpu).unwrap();
        let a = model.forward(&ids).unwrap();
        let b = model
            .forward_with(Forward::embeds(&model.embed(&ids).unwrap()))
            .unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn a_prefix_in_the_cache_acts_as_earlier_tokens() {
        // Running [p; x] equals running x with p's keys/values as a prefix (prefix tuning's
        // mechanism), when the prefix keys are the ones p itself produced.
        let mut model = tiny_model();
        model.set_sliding_window(None);
        let all = Tensor::new(&[[5u32, 8, 2, 9, 4, 11, 3]], &Device::Cpu).unwrap();
        let full = model.forward(&all).unwrap().narrow(1, 3, 4).unwrap();
        let mut cache = model.new_cache();
        model
            .forward_with(Forward::ids(&all.narrow(1, 0, 3).unwrap()).with_cache(&mut cache))
            .unwrap();
        let prefix = (0..model.layers.len())
            .map(|i| cache.layer(i).unwrap().clone())
            .collect();
        let mut prefixed = KvCache::from_prefix(prefix, None).unwrap();
        let rest = model
            .forward_with(Forward::ids(&all.narrow(1, 3, 4).unwrap()).with_cache(&mut prefixed))
            .unwrap();
        let diff = (full - rest)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-10, "{diff}");
    }

    #[test]
    fn fused_norm_and_rope_equal_their_compositions() {
        // The decoder runs the fused ops; the plain candle compositions are the reference.
        let model = tiny_model();
        let x = Tensor::randn(0f64, 1., (2, 5, 16), &Device::Cpu).unwrap();
        let norm = &model.layers[0].input_layernorm;
        let d = (norm.forward(&x).unwrap() - norm.forward_unfused(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "rms_norm: {d}");
        let q = Tensor::randn(0f64, 1., (2, 4, 5, 4), &Device::Cpu).unwrap();
        let positions = Tensor::new(&[[0u32, 1, 2, 3, 4]], &Device::Cpu).unwrap();
        let (cos, sin) = model.rope.tables(&positions).unwrap();
        let d = (Rope::apply(&q, &cos, &sin).unwrap()
            - Rope::apply_unfused(&q, &cos, &sin).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        assert!(d < 1e-6, "rope: {d}");
    }

    #[test]
    fn packed_segments_equal_separate_runs() {
        // Two examples packed in one row with restarted positions give the logits each
        // gives alone.
        let model = tiny_model();
        let a = Tensor::new(&[[5u32, 8, 2]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[9u32, 4, 11, 3, 7]], &Device::Cpu).unwrap();
        let packed = Tensor::cat(&[&a, &b], 1).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
        let seg = Tensor::new(&[[0u32, 0, 0, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let out = model
            .forward_with(
                Forward::ids(&packed)
                    .with_position_ids(&pos)
                    .with_segment_ids(&seg),
            )
            .unwrap();
        let want = Tensor::cat(
            &[&model.forward(&a).unwrap(), &model.forward(&b).unwrap()],
            1,
        )
        .unwrap();
        let diff = (out - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-10, "{diff}");
    }

    #[test]
    fn every_projection_has_a_path() {
        let model = tiny_model();
        let paths = model.linear_paths();
        assert_eq!(paths.len(), 3 * 7 + 1);
        assert!(paths.contains(&"model.layers.2.mlp.down_proj".to_string()));
        assert!(paths.contains(&"lm_head".to_string()));
        for p in &paths {
            assert!(model.linear(p).is_ok(), "{p}");
        }
        let err = model.linear("model.layers.1.self_attn.q_prj").unwrap_err();
        assert!(
            err.to_string().contains("model.layers.1.self_attn.q_proj"),
            "{err}"
        );
    }
}
