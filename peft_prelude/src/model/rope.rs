//! Rotary position embeddings in the Hugging Face "rotate half" layout, as a differentiable
//! composition (candle's fused `rope` has no backward).

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_positions, head_dim]`: `cos(pos · inv_freq)` repeated for both halves.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let mut angles = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            for _ in 0..2 {
                angles.extend(inv_freq.iter().map(|f| pos as f32 * f));
            }
        }
        let angles = Tensor::from_vec(angles, (max_positions, head_dim), device)?;
        Ok(Rope {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// cos/sin for `positions: [b, t]` (u32), shaped `[b, 1, t, head_dim]` to broadcast over heads.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let max = flat.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max >= self.max_positions() {
            return Err(Error::InvalidArgument(format!(
                "position {max} is beyond the model's max_position_embeddings ({})",
                self.max_positions()
            )));
        }
        let d = self.cos.dim(1)?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
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
