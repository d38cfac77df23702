//! AdamW exactly as `torch.optim.AdamW` (single-tensor path) computes it, on candle Vars,
//! with f32 moments whatever the parameter dtype, or with block-wise 8-bit moments
//! (`adamw_8bit`). The moments live on each parameter's device and one step is two fused ops
//! per parameter there (`peft_kernels::adamw`): nothing goes through the host.

use candle_core::{DType, Tensor, Var};
use peft_kernels::adamw::adamw8::{self, adamw8_step, Layout8};
use peft_kernels::adamw::{adamw_step, AdamWStep};
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

impl AdamWConfig {
    /// The scalars of update number `t` (from 1).
    fn step(&self, t: usize) -> AdamWStep {
        AdamWStep::new(
            self.lr,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            t as i32,
        )
    }
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

/// Per-parameter state: first and second moments (f32, the parameter's shape and device).
#[derive(Debug, Clone)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    /// Per parameter, `[exp_avg; exp_avg_sq]` flattened: f32 `[2, n]` on its device.
    state: Vec<Tensor>,
    /// Optimizer steps taken.
    step: usize,
}

/// One update of `var` from `grad` by `update(p, g, state) -> (p', state')` (f32 operands on
/// the var's device); returns the new state.
fn update_var(
    var: &Var,
    grad: &Tensor,
    state: &Tensor,
    update: impl FnOnce(&Tensor, &Tensor, &Tensor) -> candle_core::Result<(Tensor, Tensor)>,
) -> Result<Tensor> {
    let p = var.as_tensor().to_dtype(DType::F32)?;
    let (new_p, new_state) = update(&p, &grad.to_dtype(DType::F32)?, state)?;
    var.set(&new_p.to_dtype(var.dtype())?)?;
    Ok(new_state)
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        if params.is_empty() {
            return Err(Error::InvalidArgument(
                "AdamW needs at least one trainable parameter".into(),
            ));
        }
        let state = params
            .iter()
            .map(|(_, v)| Ok(Tensor::zeros((2, v.elem_count()), DType::F32, v.device())?))
            .collect::<Result<_>>()?;
        Ok(AdamW {
            config,
            params,
            state,
            step: 0,
        })
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

    /// The moments, one per parameter (views of the state, no copy).
    pub fn state(&self) -> Result<Vec<Moments>> {
        self.params
            .iter()
            .zip(&self.state)
            .map(|((_, var), st)| {
                Ok(Moments {
                    exp_avg: st.get(0)?.reshape(var.shape())?,
                    exp_avg_sq: st.get(1)?.reshape(var.shape())?,
                })
            })
            .collect()
    }

    /// Restores moments and the step count (from a checkpoint).
    pub fn restore(&mut self, state: Vec<Moments>, step: usize) -> Result<()> {
        check_restored(&self.params, &state)?;
        self.state = self
            .params
            .iter()
            .zip(&state)
            .map(|((_, var), m)| {
                let flat = |t: &Tensor| -> candle_core::Result<Tensor> {
                    t.to_dtype(DType::F32)?
                        .to_device(var.device())?
                        .flatten_all()
                };
                Ok(Tensor::stack(
                    &[flat(&m.exp_avg)?, flat(&m.exp_avg_sq)?],
                    0,
                )?)
            })
            .collect::<Result<_>>()?;
        self.step = step;
        Ok(())
    }

    /// One update with the given gradients (one per parameter, in order; `None` = no update
    /// for that parameter this step).
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        self.step += 1;
        let s = self.config.step(self.step);
        for ((_, var), (state, grad)) in self.params.iter().zip(self.state.iter_mut().zip(grads)) {
            let Some(grad) = grad else { continue };
            *state = update_var(var, grad, state, |p, g, st| adamw_step(p, g, st, s))?;
        }
        Ok(())
    }
}

/// Restored moments: one pair per parameter, each with the parameter's element count.
fn check_restored(params: &[(String, Var)], state: &[Moments]) -> Result<()> {
    if state.len() != params.len() {
        return Err(Error::InvalidArgument(format!(
            "optimizer state has {} entries, the optimizer {} parameters",
            state.len(),
            params.len()
        )));
    }
    for ((name, var), m) in params.iter().zip(state) {
        for t in [&m.exp_avg, &m.exp_avg_sq] {
            if t.elem_count() != var.elem_count() {
                return Err(Error::InvalidArgument(format!(
                    "optimizer state for `{name}` has {} values, the parameter {}",
                    t.elem_count(),
                    var.elem_count()
                )));
            }
        }
    }
    Ok(())
}

/// Scales gradients so that their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    // The sums of squares stay on the gradients' device; one value crosses to the host.
    let sums: Vec<Tensor> = grads
        .iter()
        .flatten()
        .map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all())
        .collect::<candle_core::Result<_>>()?;
    let total = if sums.is_empty() {
        0.0
    } else {
        Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?
    };
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

/// AdamW with block-wise 8-bit moments (`optim="adamw_8bit"`): the same update as
/// [`AdamW`], computed in f32 from the stored moments, which are then stored rounded again
/// (`peft_kernels::adamw::adamw8` describes the format: 2 bytes per parameter for both
/// moments instead of 8).
#[derive(Debug)]
pub struct AdamW8bit {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    /// Per parameter, its 8-bit state (u8) on its device.
    state: Vec<Tensor>,
    step: usize,
}

impl AdamW8bit {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        if params.is_empty() {
            return Err(Error::InvalidArgument(
                "AdamW needs at least one trainable parameter".into(),
            ));
        }
        let state = params
            .iter()
            .map(|(_, v)| Ok(adamw8::zeros(v.elem_count(), v.device())?))
            .collect::<Result<_>>()?;
        Ok(AdamW8bit {
            config,
            params,
            state,
            step: 0,
        })
    }

    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        self.step += 1;
        let s = self.config.step(self.step);
        for ((_, var), (state, grad)) in self.params.iter().zip(self.state.iter_mut().zip(grads)) {
            let Some(grad) = grad else { continue };
            *state = update_var(var, grad, state, |p, g, st| adamw8_step(p, g, st, s))?;
        }
        Ok(())
    }

    /// Bytes held by the moments.
    pub fn state_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|(_, v)| Layout8::new(v.elem_count()).bytes())
            .sum()
    }

    /// The moments as stored, dequantized to f32 (for checkpoints).
    pub fn moments(&self) -> Result<Vec<Moments>> {
        self.params
            .iter()
            .zip(&self.state)
            .map(|((_, var), st)| {
                let (m, v) = adamw8::decode(st, var.elem_count())?;
                Ok(Moments {
                    exp_avg: Tensor::from_vec(m, var.shape(), var.device())?,
                    exp_avg_sq: Tensor::from_vec(v, var.shape(), var.device())?,
                })
            })
            .collect()
    }

    pub fn restore(&mut self, state: Vec<Moments>, step: usize) -> Result<()> {
        check_restored(&self.params, &state)?;
        self.state = self
            .params
            .iter()
            .zip(&state)
            .map(|((_, var), m)| {
                let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
                };
                Ok(adamw8::encode(
                    &host(&m.exp_avg)?,
                    &host(&m.exp_avg_sq)?,
                    var.device(),
                )?)
            })
            .collect::<Result<_>>()?;
        self.step = step;
        Ok(())
    }
}

/// The optimizers `TrainingArgs::optim` names.
#[derive(Debug)]
pub enum Optimizer {
    AdamW(AdamW),
    AdamW8bit(AdamW8bit),
}

impl Optimizer {
    pub fn new(kind: &str, params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        Ok(match kind {
            "adamw_8bit" => Optimizer::AdamW8bit(AdamW8bit::new(params, config)?),
            _ => Optimizer::AdamW(AdamW::new(params, config)?),
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        match self {
            Optimizer::AdamW(o) => o.params(),
            Optimizer::AdamW8bit(o) => &o.params,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optimizer::AdamW(o) => o.config.lr = lr,
            Optimizer::AdamW8bit(o) => o.config.lr = lr,
        }
    }

    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step(grads),
            Optimizer::AdamW8bit(o) => o.step(grads),
        }
    }

    pub fn steps_taken(&self) -> usize {
        match self {
            Optimizer::AdamW(o) => o.steps_taken(),
            Optimizer::AdamW8bit(o) => o.step,
        }
    }

    pub fn moments(&self) -> Result<Vec<Moments>> {
        match self {
            Optimizer::AdamW(o) => o.state(),
            Optimizer::AdamW8bit(o) => o.moments(),
        }
    }

    pub fn restore(&mut self, state: Vec<Moments>, step: usize) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.restore(state, step),
            Optimizer::AdamW8bit(o) => o.restore(state, step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clipping_measures_the_global_norm_and_scales_every_gradient_to_the_limit() {
        let dev = Device::Cpu;
        let mut grads = vec![
            Some(Tensor::new(&[3f32, 0.0], &dev).unwrap()),
            None,
            Some(Tensor::new(&[[4f32]], &dev).unwrap()),
        ];
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert_eq!(norm, 5.0);
        let a: Vec<f32> = grads[0].as_ref().unwrap().to_vec1().unwrap();
        let b: Vec<Vec<f32>> = grads[2].as_ref().unwrap().to_vec2().unwrap();
        let coef = 1.0 / (5.0 + 1e-6);
        assert_eq!(a, [(3.0 * coef) as f32, 0.0]);
        assert_eq!(b, [[(4.0 * coef) as f32]]);
        // Below the limit nothing changes; no gradients at all is a norm of zero.
        let again = clip_grad_norm(&mut grads, 10.0).unwrap();
        assert!((again - 1.0).abs() < 1e-6, "{again}");
        assert_eq!(grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), a);
        assert_eq!(clip_grad_norm(&mut [None], 1.0).unwrap(), 0.0);
    }

    #[test]
    fn eight_bit_moments_follow_the_full_precision_optimizer() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., 1000, &dev).unwrap();
        let a = Var::from_tensor(&init).unwrap();
        let b = Var::from_tensor(&init).unwrap();
        let cfg = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut full = AdamW::new(vec![("p".into(), a.clone())], cfg).unwrap();
        let mut q = AdamW8bit::new(vec![("p".into(), b.clone())], cfg).unwrap();
        for _ in 0..20 {
            let g = Tensor::randn(0f32, 1., 1000, &dev).unwrap();
            full.step(&[Some(g.clone())]).unwrap();
            q.step(&[Some(g)]).unwrap();
        }
        let moved = (a.as_tensor() - &init)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 0.05 * moved,
            "8-bit drifts by {diff} vs movement {moved}"
        );
        assert!(q.state_bytes() < 1000 * 3, "{} bytes", q.state_bytes());
    }
}
