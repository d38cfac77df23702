//! The attention bias of a forward pass: causal order over slots, the sliding window, padding
//! (of new tokens and of those in the cache) and the segments of packed sequences, as one
//! additive `[batch or 1, 1, queries, keys]` tensor.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where the new tokens sit relative to the cached keys, for building the attention bias.
pub(crate) struct AttentionLayout<'a> {
    pub batch: usize,
    pub seq: usize,
    /// Slot of the first key the cache still holds.
    pub cache_start: usize,
    /// Slots seen before the new tokens.
    pub past: usize,
    pub window: Option<usize>,
    pub cached_key_mask: Option<&'a Vec<Vec<f32>>>,
    pub new_key_mask: Option<&'a Vec<Vec<f32>>>,
    /// Example index per new token (packed sequences).
    pub segments: Option<&'a Vec<Vec<u32>>>,
}

/// The additive attention bias `[batch or 1, 1, seq, keys]`: 0 where a query may attend,
/// `f32::MIN` elsewhere (a finite value, as transformers uses: an all-masked padding row then
/// stays finite instead of turning into NaN). `None` when every query sees every key.
pub(crate) fn attention_bias(l: &AttentionLayout<'_>, device: &Device) -> Result<Option<Tensor>> {
    let kept = l.past - l.cache_start;
    let keys = kept + l.seq;
    let padded = l.cached_key_mask.is_some() || l.new_key_mask.is_some() || l.segments.is_some();
    let visible = |q_slot: usize, k_slot: usize| {
        k_slot <= q_slot && l.window.is_none_or(|w| k_slot.saturating_add(w) > q_slot)
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
pub(crate) fn segment_rows(segments: &Tensor, batch: usize, seq: usize) -> Result<Vec<Vec<u32>>> {
    if segments.dims() != [batch, seq] {
        return Err(Error::InvalidArgument(format!(
            "segment_ids has shape {:?}, expected [{batch}, {seq}]",
            segments.dims()
        )));
    }
    Ok(segments.to_dtype(DType::U32)?.to_vec2::<u32>()?)
}

/// An attention mask tensor `[batch, seq]` as host rows of 0.0 / 1.0.
pub(crate) fn mask_rows(mask: &Tensor, batch: usize, seq: usize) -> Result<Vec<Vec<f32>>> {
    if mask.dims() != [batch, seq] {
        return Err(Error::InvalidArgument(format!(
            "attention_mask has shape {:?}, expected [{batch}, {seq}]",
            mask.dims()
        )));
    }
    Ok(mask.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(seq: usize, window: Option<usize>) -> AttentionLayout<'static> {
        AttentionLayout {
            batch: 1,
            seq,
            cache_start: 0,
            past: 0,
            window,
            cached_key_mask: None,
            new_key_mask: None,
            segments: None,
        }
    }

    fn visible_keys(bias: &Tensor) -> Vec<Vec<bool>> {
        let (_, _, q, k) = bias.dims4().unwrap();
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (0..q)
            .map(|i| (0..k).map(|j| v[i * k + j] == 0.0).collect())
            .collect()
    }

    #[test]
    fn causal_and_sliding_window() {
        let d = Device::Cpu;
        assert!(attention_bias(&layout(1, None), &d).unwrap().is_none());
        let causal = visible_keys(&attention_bias(&layout(3, None), &d).unwrap().unwrap());
        assert_eq!(
            causal,
            [
                [true, false, false],
                [true, true, false],
                [true, true, true]
            ]
        );
        let window = visible_keys(&attention_bias(&layout(4, Some(2)), &d).unwrap().unwrap());
        assert_eq!(
            window[3],
            [false, false, true, true],
            "itself and one before"
        );
    }

    #[test]
    fn padding_and_segments_hide_keys() {
        let d = Device::Cpu;
        let pad = vec![vec![0.0, 1.0, 1.0]];
        let segments = vec![vec![0, 0, 1]];
        let l = AttentionLayout {
            new_key_mask: Some(&pad),
            segments: Some(&segments),
            ..layout(3, None)
        };
        let v = visible_keys(&attention_bias(&l, &d).unwrap().unwrap());
        assert_eq!(v[1], [false, true, false], "padding hidden");
        assert_eq!(v[2], [false, false, true], "other segment hidden");
    }
}
