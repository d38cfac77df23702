//! RMSNorm as a differentiable composition (candle's fused `rms_norm` has no backward).

use candle_core::{DType, Tensor, D};

use crate::error::Result;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            weight: weight.detach(),
            eps,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// `w * (x / sqrt(mean(x², -1) + eps))`, accumulated in (at least) f32 like the reference,
    /// as one fused op whose backward gives the input gradient only (the weight is frozen).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(peft_kernels::rms_norm(x, &self.weight, self.eps)?)
    }

    /// The same as a plain candle composition (the reference the fused op is tested against).
    pub fn forward_unfused(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(accumulation_dtype(dtype))?;
        let mean_sq = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (mean_sq + self.eps)?.sqrt()?.recip()?;
        let normed = xf.broadcast_mul(&inv_rms)?.to_dtype(dtype)?;
        Ok(peft_kernels::frozen::mul_const(
            &normed,
            &self.weight.to_dtype(dtype)?,
        )?)
    }
}

/// f32 for f32/f16/bf16 activations; f64 stays f64 (gradient checks run in f64).
pub(crate) fn accumulation_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
