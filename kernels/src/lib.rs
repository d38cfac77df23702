//! Fused operations used by `peft_prelude`, as candle custom ops with a forward and a backward.
//!
//! Every op here has a CPU implementation; the CUDA ones live behind the `cuda` feature.

pub mod adamw;
pub mod frozen;
