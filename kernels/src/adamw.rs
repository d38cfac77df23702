//! The AdamW update, bit-exact with `torch.optim.AdamW` on CPU (whose kernels fuse the
//! first-moment lerp and the second-moment addcmul into fused multiply-adds), as a plain loop
//! over host slices and as tensor ops on any device, with f32 moments ([`adamw_step`]) or
//! block-wise 8-bit moments ([`adamw8`]). The tensor ops compute one element the same way on
//! the CPU and in `cuda/adamw.cu`, so the optimizer state stays on the parameter's device.
//!
//! Each step is two functional ops: the new moments from `(g, state)`, and the new parameter
//! from `(p, g, state)` (recomputing the new moments rather than reading them back, which for
//! 8-bit moments also means the parameter sees the unrounded moments, as bitsandbytes does).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::common::slice;
use crate::rows::multiversion;

pub mod adamw8;

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

    /// The new moments from the gradient and the old ones (`cuda/adamw.cu`'s `moments`).
    #[inline(always)]
    pub fn moments(&self, g: f32, m: f32, v: f32) -> (f32, f32) {
        (
            self.one_minus_beta1.mul_add(g - m, m),
            (self.one_minus_beta2 * g).mul_add(g, v * self.beta2),
        )
    }

    /// The new parameter from the old one and the new moments (`cuda/adamw.cu`'s `param`).
    #[inline(always)]
    pub fn param(&self, p: f32, m: f32, v: f32) -> f32 {
        let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
        p * self.decay + (-self.step_size * m) / denom
    }
}

multiversion! {
    /// Updates `p`, `m`, `v` in place from `g`.
    pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for j in 0..p.len() {
                    let (mj, vj) = s.moments(g[j], m[j], v[j]);
                    p[j] = s.param(p[j], mj, vj);
                    m[j] = mj;
                    v[j] = vj;
                }
            });
    }
}

multiversion! {
    /// The new moments `[m'; v']` into `out` (`2n`).
    fn new_moments(g: &[f32], st: &[f32], out: &mut [f32], s: AdamWStep) {
        let n = g.len();
        let (m, v) = st.split_at(n);
        let (mo, vo) = out.split_at_mut(n);
        mo.par_chunks_mut(CHUNK)
            .zip(vo.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (mo, vo))| {
                let base = c * CHUNK;
                for j in 0..mo.len() {
                    let i = base + j;
                    (mo[j], vo[j]) = s.moments(g[i], m[i], v[i]);
                }
            });
    }
}

multiversion! {
    /// The new parameter into `out` (`n`), the new moments recomputed.
    fn new_param(p: &[f32], g: &[f32], st: &[f32], out: &mut [f32], s: AdamWStep) {
        let n = p.len();
        let (m, v) = st.split_at(n);
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            let base = c * CHUNK;
            for (j, o) in o.iter_mut().enumerate() {
                let i = base + j;
                let (mi, vi) = s.moments(g[i], m[i], v[i]);
                *o = s.param(p[i], mi, vi);
            }
        });
    }
}

/// Elements per parallel task of the CPU ops.
const CHUNK: usize = 1 << 14;

/// One AdamW step on `p` (f32, contiguous) with gradient `g` (f32, `p`'s shape) and the f32
/// moments `state: [2, n]` (`exp_avg` then `exp_avg_sq`), on their device. Returns the new
/// parameter (`p`'s shape) and the new state; nothing is modified in place.
pub fn adamw_step(
    p: &Tensor,
    g: &Tensor,
    state: &Tensor,
    s: AdamWStep,
) -> Result<(Tensor, Tensor)> {
    let n = p.elem_count();
    check_operands("adamw", p, g)?;
    if state.dims() != [2, n] || state.dtype() != DType::F32 {
        bail!(
            "adamw: the state must be f32 [2, {n}], got {:?} {:?}",
            state.dtype(),
            state.dims()
        )
    }
    let (g, state) = (g.contiguous()?, state.contiguous()?);
    let new_state = g.apply_op2_no_bwd(&state, &Moments(s))?;
    let new_p = p
        .contiguous()?
        .apply_op3_no_bwd(&g, &state, &Param(s))?
        .reshape(p.shape())?;
    Ok((new_p, new_state))
}

/// `p` and `g`: f32, the same number of elements.
pub(crate) fn check_operands(op: &str, p: &Tensor, g: &Tensor) -> Result<()> {
    if p.dtype() != DType::F32 || g.dtype() != DType::F32 || g.elem_count() != p.elem_count() {
        bail!(
            "{op}: parameter {:?} {:?} and gradient {:?} {:?} must be f32 and the same size",
            p.dtype(),
            p.dims(),
            g.dtype(),
            g.dims()
        )
    }
    Ok(())
}

/// `(g, [m; v]) -> [m'; v']`.
struct Moments(AdamWStep);

impl CustomOp2 for Moments {
    fn name(&self) -> &'static str {
        "peft-adamw-moments"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        st: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (g, st) = (slice::<f32>(g, gl, op)?, slice::<f32>(st, sl, op)?);
        let mut out = vec![0f32; st.len()];
        new_moments(g, st, &mut out, self.0);
        Ok((CpuStorage::F32(out), sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        st: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::adamw_moments(g, gl, st, sl, &self.0)?;
        Ok((out, sl.shape().clone()))
    }
}

/// `(p, g, [m; v]) -> p'` (flat).
struct Param(AdamWStep);

impl CustomOp3 for Param {
    fn name(&self) -> &'static str {
        "peft-adamw-param"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        st: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (p, g) = (slice::<f32>(p, pl, op)?, slice::<f32>(g, gl, op)?);
        let st = slice::<f32>(st, sl, op)?;
        let n = p.len();
        let mut out = vec![0f32; n];
        new_param(p, g, st, &mut out, self.0);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        st: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::adamw_param(p, pl, g, gl, st, sl, &self.0)?;
        Ok((out, Shape::from(pl.shape().elem_count())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pseudo_random;
    use candle_core::Device;

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        pseudo_random(n, seed).iter().map(|x| x * scale).collect()
    }

    #[test]
    fn the_tensor_ops_are_bit_exact_with_the_fused_loop() -> Result<()> {
        let n = 40_000; // more than two parallel chunks
        let s = AdamWStep::new(2e-4, 0.9, 0.999, 1e-8, 0.01, 3);
        let (p, g) = (values(n, 1, 2.0), values(n, 2, 0.1));
        let (m, v) = (
            values(n, 3, 0.01),
            values(n, 4, 1e-4)
                .iter()
                .map(|x| x.abs())
                .collect::<Vec<_>>(),
        );
        let state = Tensor::from_slice(&[m.clone(), v.clone()].concat(), (2, n), &Device::Cpu)?;
        let pt = Tensor::from_slice(&p, (200, n / 200), &Device::Cpu)?;
        let gt = Tensor::from_slice(&g, (200, n / 200), &Device::Cpu)?;
        let (new_p, new_state) = adamw_step(&pt, &gt, &state, s)?;
        assert_eq!(new_p.dims(), [200, n / 200]);

        let (mut p, mut m, mut v) = (p, m, v);
        adamw_update(&mut p, &g, &mut m, &mut v, s);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&new_p.flatten_all()?.to_vec1()?), bits(&p));
        assert_eq!(bits(&new_state.get(0)?.to_vec1()?), bits(&m));
        assert_eq!(bits(&new_state.get(1)?.to_vec1()?), bits(&v));
        Ok(())
    }

    #[test]
    fn wrong_operands_are_errors() -> Result<()> {
        let s = AdamWStep::new(1e-3, 0.9, 0.999, 1e-8, 0.0, 1);
        let p = Tensor::zeros(8, DType::F32, &Device::Cpu)?;
        let state = Tensor::zeros((2, 8), DType::F32, &Device::Cpu)?;
        let e = adamw_step(&p, &Tensor::zeros(7, DType::F32, &Device::Cpu)?, &state, s);
        assert!(e.unwrap_err().to_string().contains("same size"));
        let e = adamw_step(&p, &p, &Tensor::zeros((2, 7), DType::F32, &Device::Cpu)?, s);
        assert!(e.unwrap_err().to_string().contains("[2, 8]"));
        Ok(())
    }
}
