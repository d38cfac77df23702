//! Learning-rate schedules with transformers' names and formulas (`get_scheduler`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl std::str::FromStr for SchedulerType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => SchedulerType::Linear,
            "cosine" => SchedulerType::Cosine,
            "constant" => SchedulerType::Constant,
            "constant_with_warmup" => SchedulerType::ConstantWithWarmup,
            other => {
                return Err(Error::Config(format!(
                    "lr_scheduler_type `{other}` (supported: linear, cosine, constant, constant_with_warmup)"
                )))
            }
        })
    }
}

/// The learning rate for optimizer step `step + 1` (transformers' `get_last_lr()` after
/// `step` scheduler steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: SchedulerType,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let warming = step < self.warmup_steps;
        match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup if warming => s / w.max(1.0),
            SchedulerType::ConstantWithWarmup => 1.0,
            SchedulerType::Linear if warming => s / w.max(1.0),
            SchedulerType::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            SchedulerType::Cosine if warming => s / w.max(1.0),
            SchedulerType::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}
