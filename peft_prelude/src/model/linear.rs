//! The replaceable linear layer. Every projection of the decoder sits in a slot of type
//! `Box<dyn Linear>`, found by its Hugging Face module path; PEFT methods replace the frozen
//! base in a slot by a wrapper that holds the base inside.

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::quant::QuantizedWeight;

/// What the decoder needs from a projection. A wrapper (a PEFT method) implements `forward`
/// and hands out the frozen base under it; the rest has defaults.
pub trait Linear: AsAny + Send + Sync + Debug {
    /// `x: [.., in_features]` → `[.., out_features]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// `forward(silu(gate) ⊙ up)`, the MLP's down projection. Layers that can fuse it keep
    /// less for the backward (LoRA on a dense base recomputes the product there).
    fn forward_swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.forward(&peft_kernels::swiglu(gate, up)?)
    }
    /// This projection as one LoRA product over a frozen f32 base, for fused blocks
    /// (`peft_kernels::lora_mlp`), when it is exactly that for `rows` input rows: `None`
    /// (the default) wherever anything else acts (bias, DoRA, dropout, other methods).
    fn fused_lora(&self, _rows: usize) -> Option<peft_kernels::lora_mlp::LoraProjection> {
        None
    }
    /// The frozen base weight under any wrappers (for merging, export, parameter counts).
    fn base(&self) -> &FrozenLinear;
    fn base_mut(&mut self) -> &mut FrozenLinear;
    fn in_features(&self) -> usize {
        self.base().shape().1
    }
    fn out_features(&self) -> usize {
        self.base().shape().0
    }
}

/// Downcasting a projection to its concrete type (a PEFT method finds its own wrappers this
/// way); implemented for every [`Linear`].
pub trait AsAny {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<T: Linear + 'static> AsAny for T {
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

/// A frozen projection `y = x Wᵀ (+ b)` whose weight is dense or quantized (NF4, GGUF).
/// Its backward computes the input gradient only, never a gradient for `W`.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

/// How a frozen projection holds its weight.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// `[out, in]`
    Dense(Tensor),
    Quantized(Arc<dyn QuantizedWeight>),
}

impl FrozenLinear {
    /// A dense layer: `weight: [out, in]`, `bias: [out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        // A Var passed in by mistake would still get no gradient; detaching makes that explicit.
        FrozenLinear {
            weight: FrozenWeight::Dense(weight.detach()),
            bias: bias.map(|b| b.detach()),
        }
    }

    /// A layer whose weight stays quantized.
    pub fn quantized(weight: Arc<dyn QuantizedWeight>, bias: Option<Tensor>) -> Self {
        FrozenLinear {
            weight: FrozenWeight::Quantized(weight),
            bias: bias.map(|b| b.detach()),
        }
    }

    /// The tensor holding the weight's data: the dense `[out, in]` weight, or for a quantized
    /// layer its packed codes (see [`QuantizedWeight::handle`]). For the weight's *values* use
    /// [`dense_weight`](Self::dense_weight).
    pub fn weight(&self) -> &Tensor {
        match &self.weight {
            FrozenWeight::Dense(w) => w,
            FrozenWeight::Quantized(q) => q.handle(),
        }
    }

    /// How the weight is held.
    pub fn frozen_weight(&self) -> &FrozenWeight {
        &self.weight
    }

    /// The quantized weight, if the layer is quantized.
    pub fn quantized_weight(&self) -> Option<&Arc<dyn QuantizedWeight>> {
        match &self.weight {
            FrozenWeight::Dense(_) => None,
            FrozenWeight::Quantized(q) => Some(q),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, FrozenWeight::Quantized(_))
    }

    /// The weight's values as a dense `[out, in]` tensor in [`dtype`](Self::dtype): the
    /// tensor itself when dense, a transient dequantized copy when quantized.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Quantized(q) => q.dequantize(),
        }
    }

    /// The dtype of the layer's outputs (and of [`dense_weight`](Self::dense_weight)).
    pub fn dtype(&self) -> DType {
        match &self.weight {
            FrozenWeight::Dense(w) => w.dtype(),
            FrozenWeight::Quantized(q) => q.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.weight {
            FrozenWeight::Dense(w) => w.device().clone(),
            FrozenWeight::Quantized(q) => q.device(),
        }
    }

    /// The same projection with `bias` added to its output (`None`: no bias).
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias.map(|b| b.detach());
        self
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        match &self.weight {
            FrozenWeight::Dense(w) => w.dims2().unwrap_or((0, 0)),
            FrozenWeight::Quantized(q) => q.shape(),
        }
    }

    /// Replaces the weight (merging adapters into it); the shape must stay the same. A
    /// quantized layer re-quantizes the new weight in its own format.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != [self.shape().0, self.shape().1] {
            return Err(crate::error::Error::InvalidArgument(format!(
                "new weight has shape {:?}, the layer's is {:?}",
                weight.dims(),
                self.shape()
            )));
        }
        self.weight = match &self.weight {
            FrozenWeight::Dense(_) => FrozenWeight::Dense(weight.detach()),
            FrozenWeight::Quantized(q) => FrozenWeight::Quantized(q.requantize(&weight)?),
        };
        Ok(())
    }

    /// Number of parameters (weight and bias), counted unpacked.
    pub fn num_params(&self) -> usize {
        let (o, i) = self.shape();
        o * i + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// Bytes the weight occupies in memory (packed size for a quantized layer).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Quantized(q) => q.size_in_bytes(),
        }
    }
}

impl Linear for FrozenLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            FrozenWeight::Dense(w) => {
                let x = if x.dtype() == w.dtype() {
                    x.clone()
                } else {
                    x.to_dtype(w.dtype())?
                };
                peft_kernels::frozen::frozen_linear(&x, w)?
            }
            FrozenWeight::Quantized(q) => q.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn base(&self) -> &FrozenLinear {
        self
    }

    fn base_mut(&mut self) -> &mut FrozenLinear {
        self
    }
}
