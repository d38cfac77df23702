//! `TrainingArgs`: Hugging Face's `TrainingArguments` / TRL's `SFTConfig` names and meanings.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::optim::{AdamWConfig, Optimizer};
use super::schedule::{Schedule, SchedulerType};
use crate::error::{Error, Result};
use crate::model::Checkpointing;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingArgs {
    pub output_dir: PathBuf,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Gradients are clipped to this global norm (0 disables clipping).
    pub max_grad_norm: f64,
    pub num_train_epochs: f64,
    /// Overrides `num_train_epochs` when positive.
    pub max_steps: i64,
    pub lr_scheduler_type: SchedulerType,
    pub warmup_steps: usize,
    /// Used when `warmup_steps` is 0.
    pub warmup_ratio: f64,
    pub logging_steps: usize,
    /// A checkpoint every this many steps (`None`: only when asked).
    pub save_steps: Option<usize>,
    /// Older checkpoints beyond this many are deleted.
    pub save_total_limit: Option<usize>,
    /// Evaluation loss every this many steps (needs an eval dataset).
    pub eval_steps: Option<usize>,
    pub seed: u64,
    /// "adamw_torch" (also "adamw") or "adamw_8bit".
    pub optim: String,
    /// Recompute each layer's activations in backward instead of keeping them.
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`: recompute only the first this many layers and keep the
    /// others' activations (`None`: all layers). Memory and step time fall in between.
    pub gradient_checkpointing_layers: Option<usize>,
    /// SFT: sequences are truncated to this many tokens.
    pub max_seq_length: usize,
    /// SFT: pack several examples per sequence (attention stays inside each example).
    pub packing: bool,
    /// SFT: loss on completions only, for prompt/completion and chat rows.
    pub completion_only_loss: bool,
    pub dataset_text_field: String,
    /// Name of this run in plots and the run log (default: derived from the settings).
    pub run_name: Option<String>,
}

impl Default for TrainingArgs {
    fn default() -> Self {
        TrainingArgs {
            output_dir: PathBuf::from("outputs"),
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: SchedulerType::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            logging_steps: 10,
            save_steps: None,
            save_total_limit: None,
            eval_steps: None,
            seed: 42,
            optim: "adamw_torch".into(),
            gradient_checkpointing: false,
            gradient_checkpointing_layers: None,
            max_seq_length: 1024,
            packing: false,
            completion_only_loss: true,
            dataset_text_field: "text".into(),
            run_name: None,
        }
    }
}

impl TrainingArgs {
    /// The reference notebook's settings (Unsloth Mistral 7B Alpaca).
    pub fn colab_reference() -> Self {
        TrainingArgs {
            per_device_train_batch_size: 2,
            gradient_accumulation_steps: 4,
            warmup_steps: 5,
            max_steps: 60,
            learning_rate: 2e-4,
            logging_steps: 1,
            optim: "adamw_8bit".into(),
            weight_decay: 0.001,
            lr_scheduler_type: SchedulerType::Linear,
            seed: 3407,
            max_seq_length: 2048,
            // The reference notebook's `use_gradient_checkpointing`.
            gradient_checkpointing: true,
            ..Default::default()
        }
    }

    pub fn validated(self) -> Result<Self> {
        let bad = |m: String| Err(Error::Config(format!("training: {m}")));
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad(
                "per_device_train_batch_size and gradient_accumulation_steps must be positive"
                    .into(),
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!(
                "learning_rate must be positive, got {}",
                self.learning_rate
            ));
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return bad("set max_steps or num_train_epochs".into());
        }
        if !matches!(self.optim.as_str(), "adamw" | "adamw_torch" | "adamw_8bit") {
            return bad(format!(
                "optim `{}` (supported: adamw_torch, adamw_8bit)",
                self.optim
            ));
        }
        if self.max_seq_length < 2 {
            return bad("max_seq_length must be at least 2".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warmup_ratio must be in [0, 1), got {}",
                self.warmup_ratio
            ));
        }
        Ok(self)
    }

    /// Which layers recompute their activations in backward (`gradient_checkpointing` and
    /// `gradient_checkpointing_layers`).
    pub fn checkpointing(&self) -> Checkpointing {
        match (
            self.gradient_checkpointing,
            self.gradient_checkpointing_layers,
        ) {
            (false, _) => Checkpointing::Off,
            (true, None) => Checkpointing::All,
            (true, Some(n)) => Checkpointing::FirstLayers(n),
        }
    }

    /// Optimizer steps of the run for `units` training examples (sequences or pairs).
    pub fn total_steps(&self, units: usize) -> usize {
        if self.max_steps > 0 {
            return self.max_steps as usize;
        }
        let micro_per_epoch = units.div_ceil(self.per_device_train_batch_size);
        let steps_per_epoch = micro_per_epoch
            .div_ceil(self.gradient_accumulation_steps)
            .max(1);
        (steps_per_epoch as f64 * self.num_train_epochs).ceil() as usize
    }

    /// The learning-rate schedule of a run over `units` examples (`warmup_steps`, else
    /// `warmup_ratio` of the steps).
    pub fn schedule(&self, units: usize) -> Schedule {
        let total = self.total_steps(units);
        let warmup = if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total as f64).ceil() as usize
        };
        Schedule {
            kind: self.lr_scheduler_type,
            base_lr: self.learning_rate,
            warmup_steps: warmup,
            total_steps: total,
        }
    }

    /// The optimizer `optim` names, over `params`.
    pub fn optimizer(&self, params: Vec<(String, candle_core::Var)>) -> Result<Optimizer> {
        Optimizer::new(
            &self.optim,
            params,
            AdamWConfig {
                lr: self.learning_rate,
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
        )
    }

    pub fn run_name(&self) -> String {
        self.run_name.clone().unwrap_or_else(|| {
            format!(
                "lr={:e} bs={}x{}",
                self.learning_rate,
                self.per_device_train_batch_size,
                self.gradient_accumulation_steps
            )
        })
    }
}
