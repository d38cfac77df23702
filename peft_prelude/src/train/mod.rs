//! Training: losses, AdamW (and 8-bit AdamW), schedules, the SFT and DPO trainers, run histories.

pub mod args;
pub mod dpo;
pub mod history;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod sft;

pub use args::TrainingArgs;
pub use dpo::{dpo_loss, DpoConfig, DpoLossType, DpoMetrics, DpoTrainer, PairLogps};
pub use history::{plot_runs, LogEntry, RunHistory};
pub use loss::{causal_lm_loss, IGNORE_INDEX};
pub use optim::{clip_grad_norm, AdamW, AdamW8bit, AdamWConfig, Optimizer};
pub use schedule::{Schedule, SchedulerType};
pub use sft::{SftTrainer, TrainOutput};
