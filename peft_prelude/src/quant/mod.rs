//! Frozen base weights that stay quantized while adapters train on top (QLoRA).
//!
//! | module | owns |
//! |---|---|
//! | [`nf4`] | the bitsandbytes-exact NF4 quantizer (blocks of 64, double quantization) |
//! | [`nf4_weight`] | an NF4 projection: forward/backward on the packed data, requantize |
//! | [`bnb`] | the serialized bitsandbytes 4-bit layout (`weight`, `weight.absmax`, `weight.quant_state…`) |
//! | [`ggml`] | a GGUF tensor (Q4_0, Q4_K, Q8_0 …) kept quantized as a projection |
//! | [`export`] | models out: 16-bit HF safetensors, bitsandbytes NF4, GGUF F16 / Q8_0 / Q4_K_M |
//!
//! Every quantized projection implements [`QuantizedWeight`] and sits inside a
//! [`FrozenLinear`](crate::model::FrozenLinear), so PEFT methods wrap it exactly as they wrap a
//! dense one.

pub mod bnb;
pub mod dynamic_map;
pub mod export;
pub mod ggml;
pub mod gguf_export;
pub mod nf4;
pub mod nf4_weight;

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

pub use ggml::GgmlWeight;
pub use nf4_weight::Nf4Weight;
pub use peft_kernels::nf4::{Absmax, Nf4Matrix, NF4_CODE};
/// Whether a quantized base trains on the integer GEMM (8-bit blocks, AVX512-VNNI or
/// AVX-VNNI), and the switch to turn that off for exact NF4/GGUF arithmetic (see
/// `peft_kernels::q8_gemm`).
pub use peft_kernels::q8_gemm::{integer_products, set_integer_products};

/// How the frozen projections of a model are stored when it is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Dense, in `LoadOptions::dtype` (GGUF weights are dequantized).
    #[default]
    None,
    /// bitsandbytes `load_in_4bit` with `bnb_4bit_quant_type="nf4"`: every projection of the
    /// decoder blocks is quantized as it loads; embeddings, norms and lm_head stay in
    /// `LoadOptions::dtype`. `double_quant` is `bnb_4bit_use_double_quant`.
    Nf4 { double_quant: bool },
    /// GGUF files: keep each projection in its file's GGML type (Q4_0, Q4_K, Q8_0 …);
    /// safetensors checkpoints load dense.
    KeepGguf,
}

impl Quantization {
    /// The Unsloth/QLoRA setting: NF4 with double quantization.
    pub const QLORA: Quantization = Quantization::Nf4 { double_quant: true };
}

/// A frozen `[out, in]` weight kept in a quantized format.
pub trait QuantizedWeight: Send + Sync + Debug {
    /// `(out_features, in_features)`.
    fn shape(&self) -> (usize, usize);
    /// The dtype of the layer's outputs and of [`dequantize`](Self::dequantize).
    fn dtype(&self) -> DType;
    fn device(&self) -> Device;
    /// `x [.., in] → [.., out]` in [`dtype`](Self::dtype); the backward gives the input
    /// gradient only.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The dense `[out, in]` weight (transient: one layer at a time).
    fn dequantize(&self) -> Result<Tensor>;
    /// The same format applied to a new dense weight (merging adapters into the base).
    fn requantize(&self, dense: &Tensor) -> Result<Arc<dyn QuantizedWeight>>;
    /// A tensor that identifies the stored data (the packed codes), for checks that no
    /// gradient reaches the base. Not the weight's values: use [`dequantize`](Self::dequantize).
    fn handle(&self) -> &Tensor;
    /// Bytes held by the quantized data and its scales.
    fn size_in_bytes(&self) -> usize;
    /// The format, e.g. `nf4`, `nf4 (double quant)`, `Q4_K`.
    fn format(&self) -> String;
    fn as_any(&self) -> &dyn Any;
}
