//! Training: losses (more to come: trainers, optimizers, schedules, checkpoints).

pub mod loss;

pub use loss::{causal_lm_loss, IGNORE_INDEX};
