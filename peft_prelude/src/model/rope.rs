//! Rotary position embeddings in the Hugging Face "rotate half" layout, as a differentiable
//! composition (candle's fused `rope` has no backward).

use candle_core::{DType, Device, Tensor, D};

use super::rope_scaling::RopeScaling;
use crate::error::{Error, Result};

/// The rotation of one kind of layer: its inverse frequencies (scaled as the config says) and
/// the factor yarn and longrope put on cos and sin. Tables are built for the positions of each
/// pass, so nothing is sized by `max_position_embeddings` (131,072 for Llama 3.1).
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    /// The inverse frequencies and attention factor when they do not depend on the length.
    fixed: Option<(Vec<f32>, f32)>,
    max_positions: usize,
    device: Device,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: RopeScaling,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        // A configuration built by hand skips `ModelConfig::validated`: refuse here what
        // `inv_freq` cannot compute rather than panic in the first forward pass.
        scaling.check_rotary_dim(head_dim).map_err(Error::Config)?;
        let mut rope = Rope {
            head_dim,
            theta,
            scaling,
            fixed: None,
            max_positions,
            device: device.clone(),
        };
        if !rope.scaling.depends_on_length() {
            rope.fixed = Some(rope.frequencies(max_positions));
        }
        Ok(rope)
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Inverse frequencies (f32, as transformers keeps them) and the attention factor for a
    /// pass over positions `0..seq_len`.
    fn frequencies(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let (inv_freq, factor) = self.scaling.inv_freq(self.head_dim, self.theta, seq_len);
        (inv_freq.iter().map(|f| *f as f32).collect(), factor as f32)
    }

    /// cos/sin for `positions: [b, t]` (u32), shaped `[b, 1, t, head_dim]` to broadcast over heads.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions
            .flatten_all()?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let max = flat.iter().copied().max().unwrap_or(0) as usize;
        if max >= self.max_positions {
            return Err(Error::InvalidArgument(format!(
                "position {max} is beyond the model's max_position_embeddings ({})",
                self.max_positions
            )));
        }
        let owned;
        let (inv_freq, factor) = match &self.fixed {
            Some((f, a)) => (f, *a),
            None => {
                owned = self.frequencies(max + 1);
                (&owned.0, owned.1)
            }
        };
        let d = self.head_dim;
        let mut cos = Vec::with_capacity(flat.len() * d);
        let mut sin = Vec::with_capacity(flat.len() * d);
        for &pos in &flat {
            for _ in 0..2 {
                for f in inv_freq {
                    // The angle in f32, as transformers computes it.
                    let angle = pos as f32 * f;
                    cos.push(angle.cos() * factor);
                    sin.push(angle.sin() * factor);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, 1, t, d), &self.device)?;
        let sin = Tensor::from_vec(sin, (b, 1, t, d), &self.device)?;
        Ok((cos, sin))
    }

    /// `x · cos + rotate_half(x) · sin` for `x: [b, heads, t, head_dim]` (may be a strided
    /// view), as one fused op with an input-only backward.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(peft_kernels::rope(x, cos, sin)?)
    }

    /// The same as a plain candle composition (the reference the fused op is tested against).
    pub fn apply_unfused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        // cos/sin are constants: no gradient is computed for the tables.
        use peft_kernels::frozen::mul_const;
        Ok((mul_const(x, &cos)? + mul_const(&rotate_half(x)?, &sin)?)?)
    }
}

/// `[x1, x2] → [-x2, x1]` over the halves of the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}
