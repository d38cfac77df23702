//! Fused operations used by `peft_prelude`, as candle custom ops with a forward and a backward.
//!
//! Every op here has a multi-threaded CPU implementation (rayon); the CUDA ones (`cuda/*.cu`,
//! compiled to PTX by `build.rs`) live behind the `cuda` feature. The public functions take
//! and return ordinary tensors on any device and pick the implementation from the device.

/// From this many input rows on (training batches, prefill) a frozen or quantized layer runs
/// as one GEMM (dequantizing a quantized layer first); below it (decoding) the row kernels of
/// [`ggml_matvec`] and [`nf4_matvec`] stream the weight once instead.
pub const GEMM_MIN_ROWS: usize = 16;

pub mod adamw;
pub mod attention;
mod attention_cpu;
mod common;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
pub mod decode_isa;
pub mod fast_exp;
pub mod frozen;
pub mod ggml_matvec;
pub mod ggml_tiles;
pub mod kquant_matvec;
pub mod launch;
pub mod lora;
pub mod lora_mlp;
pub mod lora_qkv;
pub mod rmsnorm;
pub mod rope;
mod rows;
pub mod swiglu;
pub mod swiglu_lora;
#[cfg(test)]
mod testing;

pub use cross_entropy::{
    fused_linear_cross_entropy, fused_linear_cross_entropy_int8, IGNORE_INDEX,
};
pub use lora::{
    lora_linear, lora_linear_residual, lora_linear_with, FrozenOperand, Int8Products,
    LoraProjection,
};
pub use rmsnorm::rms_norm;
pub use rope::rope;
pub use swiglu::{geglu, swiglu};
pub use swiglu_lora::{swiglu_lora_linear, swiglu_lora_linear_with};
pub mod nf4;
pub mod nf4_matvec;
pub mod q8_gemm;
