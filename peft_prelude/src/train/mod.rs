//! Training: the one training loop ([`Trainer`]) and its objectives (SFT, DPO), losses,
//! AdamW (and 8-bit AdamW), schedules, run histories.

pub mod args;
pub mod background;
pub mod dpo;
pub mod history;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod sft;
pub mod trainer;

pub use args::TrainingArgs;
pub use background::{RunHandle, RunState, RunStatus};
pub use dpo::{dpo_loss, Dpo, DpoConfig, DpoLossType, DpoMetrics, DpoTrainer, PairLogps};
pub use history::{plot_runs, LogEntry, RunHistory};
pub use loss::{causal_lm_loss, IGNORE_INDEX};
pub use optim::{clip_grad_norm, AdamW, AdamW8bit, AdamWConfig, Optimizer};
pub use schedule::{Schedule, SchedulerType};
pub use sft::{Sft, SftTrainer};
pub use trainer::{Objective, StepResult, TrainOutput, Trainer, TrainerState};
