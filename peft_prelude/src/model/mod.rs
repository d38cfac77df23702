//! The decoder (Mistral, Llama, Qwen 2/3, Gemma 2/3) and its loaders.

pub mod cache;
pub mod causal_lm;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod forward;
pub mod gguf;
pub mod head;
pub mod linear;
pub mod load;
mod mask;
pub mod norm;
pub mod paths;
pub mod rope;
pub mod rope_scaling;
pub mod variant;
pub mod weights;

pub use cache::KvCache;
pub use causal_lm::CausalLm;
pub use checkpoint::{Checkpointed, Checkpointing};
pub use config::{Architecture, ModelConfig};
pub use decoder::Model;
pub use forward::Forward;
pub use head::FrozenHead;
pub use linear::{FrozenLinear, Linear};
pub use load::{HubOptions, LoadOptions, Pretrained};
