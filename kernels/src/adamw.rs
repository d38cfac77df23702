//! The AdamW update as one fused pass over a parameter, its gradient and its moments,
//! bit-exact with `torch.optim.AdamW` on CPU (whose kernels fuse the first-moment lerp and
//! the second-moment addcmul into fused multiply-adds).

use rayon::prelude::*;

/// Per-step scalars (bias corrections already folded in, as torch computes them in f64).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// `1 - lr · weight_decay`
    pub decay: f32,
    /// `1 - beta1`
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// `1 - beta2`
    pub one_minus_beta2: f32,
    /// `lr / (1 - beta1^t)`
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
}

impl AdamWStep {
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, t: i32) -> Self {
        AdamWStep {
            decay: (1.0 - lr * weight_decay) as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            step_size: (lr / (1.0 - beta1.powi(t))) as f32,
            bias_correction2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
            eps: eps as f32,
        }
    }
}

/// Updates `p`, `m`, `v` in place from `g`.
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for j in 0..p.len() {
                let pj = p[j] * s.decay;
                let mj = s.one_minus_beta1.mul_add(g[j] - m[j], m[j]);
                let vj = (s.one_minus_beta2 * g[j]).mul_add(g[j], v[j] * s.beta2);
                let denom = vj.sqrt() / s.bias_correction2_sqrt + s.eps;
                p[j] = pj + (-s.step_size * mj) / denom;
                m[j] = mj;
                v[j] = vj;
            }
        });
}
