//! What one forward pass takes besides the model: the input (token ids or embeddings), and
//! optionally a padding mask, position ids, segment ids of packed sequences and a KV cache.

use candle_core::Tensor;

use super::cache::KvCache;

/// The arguments of a forward pass. Build with [`Forward::ids`] or [`Forward::embeds`] and the
/// `with_*` methods.
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
        Self::new(Input::Ids(ids))
    }

    /// `embeds: [batch, seq, hidden]` (prompt tuning feeds virtual tokens this way).
    pub fn embeds(embeds: &'a Tensor) -> Self {
        Self::new(Input::Embeds(embeds))
    }

    fn new(input: Input<'a>) -> Self {
        Forward {
            input,
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

    /// The optional parts, each only when given (a pass over token ids with the mask,
    /// positions and segments of a batch).
    pub fn with_optional(
        mut self,
        mask: Option<&'a Tensor>,
        positions: Option<&'a Tensor>,
        segments: Option<&'a Tensor>,
    ) -> Self {
        self.attention_mask = mask;
        self.position_ids = positions;
        self.segment_ids = segments;
        self
    }

    /// `(batch, seq)` of the input.
    pub(crate) fn batch_and_len(&self) -> candle_core::Result<(usize, usize)> {
        match self.input {
            Input::Ids(ids) => ids.dims2(),
            Input::Embeds(e) => e.dims3().map(|(b, t, _)| (b, t)),
        }
    }
}
