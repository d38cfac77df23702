//! Batches: right-padded with an attention mask, or packed (several examples in one
//! sequence, positions restarting per example and attention kept inside each example).

use candle_core::{Device, Tensor};

use super::tokenize::Example;
use crate::error::{Error, Result};
use crate::train::IGNORE_INDEX;

/// Model inputs for one micro-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]` u32
    pub input_ids: Tensor,
    /// `[batch, seq]` u32, 1 = token, 0 = padding (`None`: no padding)
    pub attention_mask: Option<Tensor>,
    /// `[batch, seq]` i64
    pub labels: Tensor,
    /// `[batch, seq]` u32, for packed sequences (positions restart per example)
    pub position_ids: Option<Tensor>,
    /// `[batch, seq]` u32 example index within a packed row: attention stays inside it
    pub segment_ids: Option<Tensor>,
    /// Real (non-padding) tokens.
    pub num_tokens: usize,
    /// Tokens that count in the loss.
    pub num_label_tokens: usize,
}

impl Batch {
    /// The forward pass over this batch (ids with its mask, positions and segments).
    pub fn forward(&self) -> crate::model::Forward<'_> {
        crate::model::Forward::ids(&self.input_ids).with_optional(
            self.attention_mask.as_ref(),
            self.position_ids.as_ref(),
            self.segment_ids.as_ref(),
        )
    }
}

/// Right-pads `examples` to the longest; padded positions get `pad_id` and label -100.
pub fn pad_batch(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    if examples.is_empty() {
        return Err(Error::InvalidArgument("empty batch".into()));
    }
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    let mut labels = Vec::with_capacity(b * t);
    for e in examples {
        let pad = t - e.input_ids.len();
        ids.extend(
            e.input_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad)),
        );
        mask.extend(
            std::iter::repeat_n(1u32, e.input_ids.len()).chain(std::iter::repeat_n(0, pad)),
        );
        labels.extend(
            e.labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE_INDEX, pad)),
        );
    }
    let padded = examples.iter().any(|e| e.input_ids.len() != t);
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: if padded {
            Some(Tensor::from_vec(mask, (b, t), device)?)
        } else {
            None
        },
        labels: Tensor::from_vec(labels, (b, t), device)?,
        position_ids: None,
        segment_ids: None,
        num_tokens: examples.iter().map(|e| e.input_ids.len()).sum(),
        num_label_tokens: examples.iter().map(|e| e.num_label_tokens()).sum(),
    })
}

/// Greedily packs examples (in order) into sequences of at most `max_len` tokens. Each
/// example's first label is masked so no loss crosses an example boundary.
pub fn pack_examples(examples: &[Example], max_len: usize) -> Vec<PackedRow> {
    let mut rows: Vec<PackedRow> = vec![];
    let mut current = PackedRow::default();
    for e in examples {
        let n = e.input_ids.len().min(max_len);
        if !current.input_ids.is_empty() && current.input_ids.len() + n > max_len {
            rows.push(std::mem::take(&mut current));
        }
        let segment = current.segments;
        current.input_ids.extend(&e.input_ids[..n]);
        current.labels.push(IGNORE_INDEX);
        current.labels.extend(&e.labels[1..n]);
        current.position_ids.extend(0..n as u32);
        current.segment_ids.extend(std::iter::repeat_n(segment, n));
        current.segments += 1;
    }
    if !current.input_ids.is_empty() {
        rows.push(current);
    }
    rows
}

/// One packed sequence.
#[derive(Debug, Clone, Default)]
pub struct PackedRow {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
    segments: u32,
}

/// Pads packed rows into a batch (padding forms its own segment, masked out).
pub fn packed_batch(rows: &[&PackedRow], pad_id: u32, device: &Device) -> Result<Batch> {
    let examples: Vec<Example> = rows
        .iter()
        .map(|r| Example {
            input_ids: r.input_ids.clone(),
            labels: r.labels.clone(),
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let mut batch = pad_batch(&refs, pad_id, device)?;
    let t = batch.input_ids.dim(1)?;
    let (mut pos, mut seg) = (
        Vec::with_capacity(rows.len() * t),
        Vec::with_capacity(rows.len() * t),
    );
    for r in rows {
        let pad = t - r.input_ids.len();
        pos.extend(
            r.position_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
        seg.extend(
            r.segment_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(u32::MAX, pad)),
        );
    }
    batch.position_ids = Some(Tensor::from_vec(pos, (rows.len(), t), device)?);
    batch.segment_ids = Some(Tensor::from_vec(seg, (rows.len(), t), device)?);
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32]) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels: ids.iter().map(|&i| i as i64).collect(),
        }
    }

    #[test]
    fn padding_masks_labels_and_attention() {
        let (a, b) = (ex(&[1, 5, 6]), ex(&[1, 7]));
        let batch = pad_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.labels.to_vec2::<i64>().unwrap(),
            vec![vec![1, 5, 6], vec![1, 7, -100]]
        );
        assert_eq!(
            batch.attention_mask.unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 1, 0]]
        );
        assert_eq!(batch.num_label_tokens, 3);
    }

    #[test]
    fn packing_restarts_positions_and_masks_boundaries() {
        let rows = pack_examples(&[ex(&[1, 5, 6]), ex(&[1, 7]), ex(&[1, 8, 9, 10])], 6);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input_ids, vec![1, 5, 6, 1, 7]);
        assert_eq!(rows[0].labels, vec![-100, 5, 6, -100, 7]);
        assert_eq!(rows[0].position_ids, vec![0, 1, 2, 0, 1]);
        assert_eq!(rows[0].segment_ids, vec![0, 0, 0, 1, 1]);
    }
}
