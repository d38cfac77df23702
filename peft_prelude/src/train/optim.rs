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
            return Err(Error::InvalidArgument(
                "AdamW needs at least one trainable parameter".into(),
            ));
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
        let s = AdamWStep::new(
            c.lr,
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            self.step as i32,
        );
        for ((_, var), (moments, grad)) in self.params.iter().zip(self.state.iter_mut().zip(grads))
        {
            let Some(grad) = grad else { continue };
            if var.device().is_cpu() {
                // One fused pass, bit-exact with torch.
                let shape = var.shape().clone();
                let mut p = var
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
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
                let m =
                    (&moments.exp_avg + ((&g - &moments.exp_avg)? * s.one_minus_beta1 as f64)?)?;
                let v = ((&moments.exp_avg_sq * s.beta2 as f64)?
                    + ((&g * s.one_minus_beta2 as f64)? * &g)?)?;
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
        total += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
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

/// Block size of the 8-bit moments (bitsandbytes uses 256 as well).
const BLOCK: usize = 256;

/// A moment tensor stored in 8 bits per value with one f32 scale per 256-value block.
/// The first moment is signed and stored linearly; the second moment is non-negative and
/// spans many orders of magnitude, so its square root is stored (halving the exponent range
/// the 8 bits must cover). Not bitsandbytes' dynamic code, the same memory: 2 bytes per
/// parameter for both moments instead of 8.
#[derive(Debug, Clone)]
pub struct Quantized8 {
    codes: Vec<u8>,
    scales: Vec<f32>,
    signed: bool,
}

impl Quantized8 {
    fn zeros(n: usize, signed: bool) -> Self {
        Quantized8 {
            codes: vec![if signed { 128 } else { 0 }; n],
            scales: vec![0.0; n.div_ceil(BLOCK)],
            signed,
        }
    }

    fn decode(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for (block, scale) in self.codes.chunks(BLOCK).zip(&self.scales) {
            for &c in block {
                out.push(if self.signed {
                    (c as f32 - 128.0) / 127.0 * scale
                } else {
                    let r = c as f32 / 255.0 * scale;
                    r * r
                });
            }
        }
        out
    }

    fn encode(values: &[f32], signed: bool) -> Self {
        let mut codes = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(values.len().div_ceil(BLOCK));
        for block in values.chunks(BLOCK) {
            if signed {
                let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                scales.push(absmax);
                let inv = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
                codes.extend(
                    block
                        .iter()
                        .map(|v| ((v * inv).round() + 128.0).clamp(1.0, 255.0) as u8),
                );
            } else {
                let max = block.iter().fold(0f32, |m, v| m.max(v.max(0.0).sqrt()));
                scales.push(max);
                let inv = if max > 0.0 { 255.0 / max } else { 0.0 };
                codes.extend(
                    block
                        .iter()
                        .map(|v| (v.max(0.0).sqrt() * inv).round().clamp(0.0, 255.0) as u8),
                );
            }
        }
        Quantized8 {
            codes,
            scales,
            signed,
        }
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

/// AdamW with block-wise 8-bit moments (`optim="adamw_8bit"`): the same update as
/// [`AdamW`], computed in f32 from the dequantized moments, which are then re-quantized.
#[derive(Debug)]
pub struct AdamW8bit {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    state: Vec<(Quantized8, Quantized8)>,
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
            .map(|(_, v)| {
                (
                    Quantized8::zeros(v.elem_count(), true),
                    Quantized8::zeros(v.elem_count(), false),
                )
            })
            .collect();
        Ok(AdamW8bit {
            config,
            params,
            state,
            step: 0,
        })
    }

    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let s = AdamWStep::new(
            c.lr,
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            self.step as i32,
        );
        for ((_, var), ((mq, vq), grad)) in self.params.iter().zip(self.state.iter_mut().zip(grads))
        {
            let Some(grad) = grad else { continue };
            let shape = var.shape().clone();
            let mut p = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut m = mq.decode();
            let mut v = vq.decode();
            adamw_update(&mut p, &g, &mut m, &mut v, s);
            *mq = Quantized8::encode(&m, true);
            *vq = Quantized8::encode(&v, false);
            var.set(&Tensor::from_vec(p, &shape, var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Bytes held by the moments.
    pub fn state_bytes(&self) -> usize {
        self.state.iter().map(|(m, v)| m.bytes() + v.bytes()).sum()
    }

    /// The moments dequantized (for checkpoints).
    pub fn moments(&self) -> Result<Vec<Moments>> {
        self.params
            .iter()
            .zip(&self.state)
            .map(|((_, var), (m, v))| {
                Ok(Moments {
                    exp_avg: Tensor::from_vec(m.decode(), var.shape(), var.device())?,
                    exp_avg_sq: Tensor::from_vec(v.decode(), var.shape(), var.device())?,
                })
            })
            .collect()
    }

    pub fn restore(&mut self, state: Vec<Moments>, step: usize) -> Result<()> {
        if state.len() != self.params.len() {
            return Err(Error::InvalidArgument(
                "optimizer state does not match the parameters".into(),
            ));
        }
        self.state = state
            .iter()
            .map(|m| {
                Ok((
                    Quantized8::encode(&m.exp_avg.flatten_all()?.to_vec1::<f32>()?, true),
                    Quantized8::encode(&m.exp_avg_sq.flatten_all()?.to_vec1::<f32>()?, false),
                ))
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
            Optimizer::AdamW(o) => Ok(o.state().to_vec()),
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
