//! The one interface generation, the trainers and evaluation use: anything that turns tokens
//! into next-token logits. The plain decoder implements it, and so does the PEFT model, whose
//! prompt methods change the forward (virtual tokens in front, key/value prefixes in every
//! layer): downstream code never sees a PEFT model as its bare base.

use candle_core::{DType, Device, Tensor};

use super::cache::KvCache;
use super::config::ModelConfig;
use super::decoder::Model;
use super::forward::Forward;
use crate::error::Result;

/// A causal language model.
///
/// Positions: a model that puts `n` virtual tokens (or prefixes) in front of the input gives
/// them positions `0..n` and the input's tokens `n..`; `with_position_ids` in the
/// [`Forward`] arguments counts from the input's first token, so callers never need to know.
pub trait CausalLm {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// The dtype of the activations (and of the logits).
    fn dtype(&self) -> DType;
    /// An empty cache for decoding with this model (a model with prefixes fills it at the
    /// first forward pass that uses it).
    fn new_cache(&self) -> KvCache;
    /// Logits `[batch, seq, vocab]`, one per input position (virtual tokens have none).
    fn logits(&self, args: Forward<'_>) -> Result<Tensor>;
    /// Logits `[batch, vocab]` of the input's last position: what decoding needs (the head
    /// runs on one position instead of all).
    fn last_logits(&self, args: Forward<'_>) -> Result<Tensor>;
}

impl CausalLm for Model {
    fn config(&self) -> &ModelConfig {
        Model::config(self)
    }

    fn device(&self) -> &Device {
        Model::device(self)
    }

    fn dtype(&self) -> DType {
        Model::dtype(self)
    }

    fn new_cache(&self) -> KvCache {
        Model::new_cache(self)
    }

    fn logits(&self, args: Forward<'_>) -> Result<Tensor> {
        self.forward_with(args)
    }

    fn last_logits(&self, args: Forward<'_>) -> Result<Tensor> {
        self.forward_last(args)
    }
}
