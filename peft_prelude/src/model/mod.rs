//! The Mistral/Llama decoder and its loaders.

pub mod cache;
pub mod causal_lm;
pub mod config;
pub mod decoder;
pub mod gguf;
pub mod linear;
pub mod load;
pub mod norm;
pub mod rope;
pub mod weights;

pub use cache::KvCache;
pub use causal_lm::CausalLm;
pub use config::{Architecture, ModelConfig};
pub use decoder::{Checkpointed, Checkpointing, Forward, Model};
pub use linear::{FrozenLinear, Linear};
pub use load::{HubOptions, LoadOptions, Pretrained};
