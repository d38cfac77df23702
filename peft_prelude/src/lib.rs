//! peft_prelude: everything a notebook cell touches.
//!
//! | module | owns |
//! |---|---|
//! | [`model`] | config, the Mistral/Llama decoder, KV cache, loaders (HF dir, hub, GGUF) |
//! | [`tokenizer`] | tokenizer.json, tokenizers rebuilt from GGUF metadata, chat templates |
//! | [`peft`] | LoRA (rsLoRA, DoRA), IA3, prompt/prefix/P-tuning, bottleneck adapters; PEFT-format save/load |
//! | [`data`] | JSON/JSONL/hub datasets, Alpaca template, tokenization, loss masks, padding, packing |
//! | [`train`] | losses, AdamW, schedules, SFT and DPO trainers |
//! | [`quant`] | NF4 (bitsandbytes-exact, double quantization), bnb-4bit checkpoints, GGUF-quantized frozen projections |
//! | [`hub`] | the Hugging Face hub cache, shared with Python; downloads through `curl` |
//! | [`generate`] | sampling, KV-cached decoding, streamers |
//! | [`notebook`] | display handles, progress, live plots, token streaming, interrupt check |
//! | [`prelude`] | one glob import for notebook cells |
//! | [`setup`] | where things are: the GPU, the models folder, the example data |
//! | [`threads`] | the process's thread count, decided once (candle re-probes it per matmul) |

// Public functions generic only for convenience (`impl AsRef<Path>`, `impl Into<..>`) are
// thin shims over a non-generic body. A notebook cell is its own crate, compiled at
// opt-level 2, where rustc re-instantiates every generic body the cell calls (upstream
// instances are not shared at that level): a cell calling `Pretrained::load` spent 4.5 s
// compiling the loader before it ran (issue 20).
pub mod data;
pub mod error;
pub mod generate;
pub mod grads;
pub mod hub;
pub mod model;
pub mod notebook;
pub mod peft;
pub mod prelude;
pub mod quant;
pub mod rng;
pub mod setup;
mod sync;
pub mod threads;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
