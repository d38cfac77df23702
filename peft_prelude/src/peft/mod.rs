//! Parameter-efficient fine-tuning methods in the Hugging Face PEFT format: LoRA (rsLoRA,
//! DoRA), IA³, prompt tuning, P-tuning, prefix tuning, and bottleneck adapters.
//!
//! Methods are applied by module path (see [`crate::model::Model::linear_paths`]); the same
//! paths name the saved tensors, so saving, loading and merging are walks over one map.

pub mod bottleneck;
pub mod config;
pub mod ia3;
mod inject;
pub mod io;
pub mod lora;
pub mod merged;
pub mod model;
pub mod prompt;
pub mod saved;
pub mod switch;
pub mod targets;

pub use config::{
    BottleneckConfig, Ia3Config, LoraConfig, LoraInit, PeftConfig, PrefixTuningConfig,
    PromptEncoderConfig, PromptLearningCommon, PromptTuningConfig, TargetModules,
};
pub use merged::SaveMethod;
pub use model::{get_peft_model, PeftModel};

/// Trainable parameters are f32 whatever the activations (bf16 on GPU, f32 on CPU); an f64
/// model (gradient checks) gets f64 parameters.
pub fn param_dtype(model_dtype: candle_core::DType) -> candle_core::DType {
    if model_dtype == candle_core::DType::F64 {
        candle_core::DType::F64
    } else {
        candle_core::DType::F32
    }
}
