//! Training: losses, AdamW, learning-rate schedules.

pub mod loss;
pub mod optim;
pub mod schedule;

pub use loss::{causal_lm_loss, IGNORE_INDEX};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig};
pub use schedule::{Schedule, SchedulerType};
