//! AdamW exactly as `torch.optim.AdamW` (single-tensor path) computes it, on candle Vars,
//! with f32 moments whatever the parameter dtype.

use candle_core::{DType, Tensor, Var};
use peft_kernels::adamw::{adamw_update, AdamWStep};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' TrainingArguments defaults (weight decay 0).
    fn default() -> Self {
        AdamWConfig {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Per-parameter state: first and second moments.
#[derive(Debug, Clone)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    state: Vec<Moments>,
    /// Optimizer steps taken.
    step: usize,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        if params.is_empty() {
            return Err(Error::InvalidArgument("AdamW needs at least one trainable parameter".into()));
        }
        let state = params
            .iter()
            .map(|(_, v)| {
                Ok(Moments {
                    exp_avg: Tensor::zeros(v.shape(), DType::F32, v.device())?,
                    exp_avg_sq: Tensor::zeros(v.shape(), DType::F32, v.device())?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { config, params, state, step: 0 })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    pub fn state(&self) -> &[Moments] {
        &self.state
    }

    /// Restores moments and the step count (from a checkpoint).
    pub fn restore(&mut self, state: Vec<Moments>, step: usize) -> Result<()> {
        if state.len() != self.params.len() {
            return Err(Error::InvalidArgument(format!(
                "optimizer state has {} entries, the optimizer {} parameters",
                state.len(),
                self.params.len()
            )));
        }
        self.state = state;
        self.step = step;
        Ok(())
    }

    /// One update with the given gradients (one per parameter, in order; `None` = no update
    /// for that parameter this step).
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let s = AdamWStep::new(c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, self.step as i32);
        for ((_, var), (moments, grad)) in self.params.iter().zip(self.state.iter_mut().zip(grads)) {
            let Some(grad) = grad else { continue };
            if var.device().is_cpu() {
                // One fused pass, bit-exact with torch.
                let shape = var.shape().clone();
                let mut p = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut m = moments.exp_avg.flatten_all()?.to_vec1::<f32>()?;
                let mut v = moments.exp_avg_sq.flatten_all()?.to_vec1::<f32>()?;
                adamw_update(&mut p, &g, &mut m, &mut v, s);
                let dev = var.device();
                var.set(&Tensor::from_vec(p, &shape, dev)?.to_dtype(var.dtype())?)?;
                moments.exp_avg = Tensor::from_vec(m, &shape, dev)?;
                moments.exp_avg_sq = Tensor::from_vec(v, &shape, dev)?;
            } else {
                // The same formula as tensor ops (without fused multiply-adds).
                let g = grad.to_dtype(DType::F32)?;
                let p = (var.as_tensor().to_dtype(DType::F32)? * s.decay as f64)?;
                let m = (&moments.exp_avg + ((&g - &moments.exp_avg)? * s.one_minus_beta1 as f64)?)?;
                let v = ((&moments.exp_avg_sq * s.beta2 as f64)? + ((&g * s.one_minus_beta2 as f64)? * &g)?)?;
                let bc2 = Tensor::new(s.bias_correction2_sqrt, v.device())?;
                let denom = (v.sqrt()?.broadcast_div(&bc2)? + s.eps as f64)?;
                let p = (p + ((&m * -(s.step_size as f64))? / &denom)?)?;
                var.set(&p.to_dtype(var.dtype())?)?;
                moments.exp_avg = m;
                moments.exp_avg_sq = v;
            }
        }
        Ok(())
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}
