//! The replaceable linear layer. Every projection of the decoder sits in a slot of type
//! `Box<dyn Linear>`, found by its Hugging Face module path; PEFT methods replace the frozen
//! base in a slot by a wrapper that holds the base inside.

use std::any::Any;
use std::fmt::Debug;

use candle_core::{Tensor, D};

use crate::error::Result;

/// What the decoder needs from a projection.
pub trait Linear: Send + Sync + Debug {
    /// `x: [.., in_features]` → `[.., out_features]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// The frozen base weight under any wrappers (for merging, export, parameter counts).
    fn base(&self) -> &FrozenLinear;
    fn base_mut(&mut self) -> &mut FrozenLinear;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// A frozen dense projection `y = x Wᵀ (+ b)`. Its backward computes the input gradient only,
/// never a gradient for `W`.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// `weight: [out, in]`, `bias: [out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        // A Var passed in by mistake would still get no gradient; detaching makes that explicit.
        FrozenLinear {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Replaces the weight (merging adapters into it); the shape must stay the same.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight.dims() {
            return Err(crate::error::Error::InvalidArgument(format!(
                "new weight has shape {:?}, the layer's is {:?}",
                weight.dims(),
                self.weight.dims()
            )));
        }
        self.weight = weight.detach();
        Ok(())
    }

    /// Number of parameters (weight and bias).
    pub fn num_params(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
}

impl Linear for FrozenLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.dtype() == self.weight.dtype() {
            x.clone()
        } else {
            x.to_dtype(self.weight.dtype())?
        };
        let y = peft_kernels::frozen::frozen_linear(&x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn in_features(&self) -> usize {
        self.weight.dim(D::Minus1).unwrap_or(0)
    }

    fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    fn base(&self) -> &FrozenLinear {
        self
    }

    fn base_mut(&mut self) -> &mut FrozenLinear {
        self
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
