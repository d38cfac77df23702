//! Key/value cache for decoding, also used to hold prefix-tuning prefixes.
//!
//! Keys are addressed by *slot*: the index of the token in the whole sequence seen so far
//! (prefix tokens included). The causal and sliding-window masks compare slots, as
//! transformers does with `cache_position`; RoPE uses position ids, which default to slots.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `[batch, kv_heads, kept, head_dim]`; `None` before the first step.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Slot of the first kept key (keys before it fell out of the sliding window).
    start: usize,
    /// Number of slots seen so far (`start + kept`).
    seen: usize,
    /// Per kept key, 1.0 = real token, 0.0 = padding; `None` = all real. `[batch, kept]`, host-side.
    key_mask: Option<Vec<Vec<f32>>>,
    /// With a sliding window, keys older than `window - 1` slots are dropped after each step.
    window: Option<usize>,
}

impl KvCache {
    pub fn new(num_layers: usize, window: Option<usize>) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            start: 0,
            seen: 0,
            key_mask: None,
            window,
        }
    }

    /// A cache that starts with per-layer prefixes (prefix tuning): `(k, v)` of shape
    /// `[batch, kv_heads, prefix_len, head_dim]`, placed at slots `0..prefix_len`.
    pub fn from_prefix(prefix: Vec<(Tensor, Tensor)>, window: Option<usize>) -> Result<Self> {
        let len = match prefix.first() {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        for (i, (k, v)) in prefix.iter().enumerate() {
            if k.dims() != v.dims() || k.rank() != 4 || k.dim(2)? != len {
                return Err(Error::InvalidArgument(format!(
                    "prefix of layer {i}: key {:?} and value {:?} must both be [batch, kv_heads, {len}, head_dim]",
                    k.dims(),
                    v.dims()
                )));
            }
        }
        Ok(KvCache {
            layers: prefix.into_iter().map(Some).collect(),
            start: 0,
            seen: len,
            key_mask: None,
            window,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Slots seen so far; the next token goes to this slot.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Slot of the first key still held.
    pub fn start(&self) -> usize {
        self.start
    }

    pub fn kept(&self) -> usize {
        self.seen - self.start
    }

    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }

    pub(crate) fn key_mask(&self) -> Option<&Vec<Vec<f32>>> {
        self.key_mask.as_ref()
    }

    /// Drops every cached key (the next forward starts a new sequence).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.start = 0;
        self.seen = 0;
        self.key_mask = None;
    }

    /// Stores layer `i`'s keys/values for the new tokens, concatenated to what it held.
    pub(crate) fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(i)
            .ok_or_else(|| Error::InvalidArgument(format!("cache has no layer {i}")))?;
        let kv = match slot.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        *slot = Some(kv.clone());
        Ok(kv)
    }

    /// Called once per forward after every layer appended `new` tokens: records their padding
    /// mask and drops keys that no future query can see.
    pub(crate) fn commit(
        &mut self,
        new: usize,
        new_mask: Option<Vec<Vec<f32>>>,
        batch: usize,
    ) -> Result<()> {
        let kept_before = self.kept();
        self.key_mask = match (self.key_mask.take(), new_mask) {
            (None, None) => None,
            (old, new_rows) => {
                let old = old.unwrap_or_else(|| vec![vec![1.0; kept_before]; batch]);
                let new_rows = new_rows.unwrap_or_else(|| vec![vec![1.0; new]; batch]);
                Some(
                    old.into_iter()
                        .zip(new_rows)
                        .map(|(mut a, b)| {
                            a.extend(b);
                            a
                        })
                        .collect(),
                )
            }
        };
        self.seen += new;
        if let Some(w) = self.window {
            let keep = w.saturating_sub(1).max(1);
            if self.kept() > keep {
                let drop = self.kept() - keep;
                for (k, v) in self.layers.iter_mut().flatten() {
                    *k = k.narrow(2, drop, keep)?;
                    *v = v.narrow(2, drop, keep)?;
                }
                if let Some(mask) = self.key_mask.as_mut() {
                    mask.iter_mut().for_each(|row| {
                        row.drain(..drop);
                    });
                }
                self.start += drop;
            }
        }
        Ok(())
    }

    /// Device of the cached tensors, if any.
    pub fn device(&self) -> Option<&Device> {
        self.layers.iter().flatten().next().map(|(k, _)| k.device())
    }
}
