//! Losses for causal language models.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// The label value that excludes a position from the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// transformers' causal-LM loss: logits at position t predict `labels[t + 1]`; the mean
/// cross-entropy over the positions whose label is not [`IGNORE_INDEX`].
///
/// `logits: [batch, seq, vocab]`, `labels: [batch, seq]` (i64). Returns the loss and the
/// number of tokens it averages over. Computed in f32 (f64 stays f64).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(Error::InvalidArgument(format!(
            "labels have shape {:?}, logits {:?}: expected labels [{b}, {t}]",
            labels.dims(),
            logits.dims()
        )));
    }
    if t < 2 {
        return Err(Error::InvalidArgument(
            "a causal-LM loss needs at least 2 positions".into(),
        ));
    }
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let shifted = logits
        .narrow(1, 0, t - 1)?
        .to_dtype(dtype)?
        .reshape((b * (t - 1), v))?;
    let targets: Vec<i64> = labels
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1()?;
    let mut index = Vec::with_capacity(targets.len());
    let mut weight = Vec::with_capacity(targets.len());
    let mut count = 0usize;
    for &y in &targets {
        if y == IGNORE_INDEX {
            index.push(0u32);
            weight.push(0f64);
        } else if y < 0 || y as usize >= v {
            return Err(Error::InvalidArgument(format!(
                "label {y} is outside the vocabulary ({v})"
            )));
        } else {
            index.push(y as u32);
            weight.push(1.0);
            count += 1;
        }
    }
    if count == 0 {
        return Err(Error::InvalidArgument(
            "every label is ignored (-100): nothing to learn from".into(),
        ));
    }
    let device = logits.device();
    let index = Tensor::from_vec(index, (b * (t - 1), 1), device)?;
    let weight = Tensor::from_vec(weight, b * (t - 1), device)?.to_dtype(dtype)?;
    let log_probs = candle_nn::ops::log_softmax(&shifted, D::Minus1)?;
    let picked = log_probs.gather(&index, 1)?.squeeze(1)?;
    let total = peft_kernels::frozen::mul_const(&picked, &weight)?.sum_all()?;
    Ok(((total.neg()? / count as f64)?, count))
}
