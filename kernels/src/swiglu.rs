//! SwiGLU: `h = silu(gate) ⊙ up` with `silu(g) = g·σ(g)`.
//!
//! The backward computes both input gradients in one pass (σ is evaluated once):
//! `d_up = dy ⊙ silu(g)`, `d_gate = dy ⊙ up ⊙ σ(g)·(1 + g·(1 − σ(g)))`. They are written into
//! one `[2, n]` buffer and handed back as two views of it.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::common::{cpu_dtype, dispatch_float, slice, Float};

/// `silu(gate) ⊙ up` for two tensors of the same shape and dtype; both get gradients.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        bail!(
            "swiglu: gate {:?} {:?} vs up {:?} {:?}",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        )
    }
    let dtype = gate.dtype();
    let compute = cpu_dtype(gate.device(), dtype);
    let g = gate.to_dtype(compute)?.contiguous()?;
    let u = up.to_dtype(compute)?.contiguous()?;
    g.apply_op2(&u, SwiGlu)?.to_dtype(dtype)
}

const BLOCK: usize = 4096;

pub(crate) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "peft-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(g: &[T], u: &[T]) -> CpuStorage {
            let mut h = vec![T::zero(); g.len()];
            h.par_chunks_mut(BLOCK)
                .zip(g.par_chunks(BLOCK).zip(u.par_chunks(BLOCK)))
                .for_each(|(hb, (gb, ub))| {
                    for ((h, &g), &u) in hb.iter_mut().zip(gb).zip(ub) {
                        *h = g / (T::one() + (-g).exp()) * u;
                    }
                });
            T::to_cpu_storage_owned(h)
        }
        let op = self.name();
        let s = dispatch_float!(op, g.dtype(), run(slice(g, gl, op)?, slice(u, ul, op)?));
        Ok((s, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::swiglu_fwd(g, gl, u, ul)?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_backward(g, u, dh)?;
        Ok((Some(dg), Some(du)))
    }
}

/// `(d_gate, d_up)` for `h = silu(gate) ⊙ up` and `dh`, without a graph.
pub(crate) fn swiglu_backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = g.apply_op3_no_bwd(u, &dh.contiguous()?, &SwiGluBwd)?;
    Ok((
        both.get(0)?.reshape(g.shape())?,
        both.get(1)?.reshape(u.shape())?,
    ))
}

/// `[d_gate, d_up]` stacked, from `(gate, up, dh)`.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "peft-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        dh: &CpuStorage,
        dhl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(g: &[T], u: &[T], dh: &[T]) -> CpuStorage {
            let n = g.len();
            let mut out = vec![T::zero(); 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_chunks_mut(BLOCK)
                .zip(du.par_chunks_mut(BLOCK))
                .zip(
                    g.par_chunks(BLOCK)
                        .zip(u.par_chunks(BLOCK))
                        .zip(dh.par_chunks(BLOCK)),
                )
                .for_each(|((dgb, dub), ((gb, ub), dhb))| {
                    for i in 0..gb.len() {
                        let (g, u, dh) = (gb[i], ub[i], dhb[i]);
                        let sig = T::one() / (T::one() + (-g).exp());
                        let silu = g * sig;
                        dub[i] = dh * silu;
                        dgb[i] = dh * u * (sig + silu * (T::one() - sig));
                    }
                });
            T::to_cpu_storage_owned(out)
        }
        let op = self.name();
        let s = dispatch_float!(
            op,
            g.dtype(),
            run(slice(g, gl, op)?, slice(u, ul, op)?, slice(dh, dhl, op)?)
        );
        Ok((s, Shape::from((2, gl.shape().elem_count()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        dh: &candle_core::CudaStorage,
        dhl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::swiglu_bwd(g, gl, u, ul, dh, dhl)?;
        Ok((out, Shape::from((2, gl.shape().elem_count()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grad_of};
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_the_composition_for_both_inputs() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let g = Var::from_tensor(&Tensor::randn(0f32, 3., (3, 4, 37), &dev)?.to_dtype(dtype)?)?;
            let u = Tensor::randn(0f32, 1., (3, 4, 37), &dev)?.to_dtype(dtype)?;
            let c = Tensor::randn(0f32, 1., (3, 4, 37), &dev)?.to_dtype(dtype)?;
            let (h, dg) = grad_of(&g, &c, |g| swiglu(g, &u))?;
            let (hr, dgr) = grad_of(&g, &c, |g| g.silu()? * &u)?;
            assert_close("swiglu h", &h, &hr, 1e-6)?;
            assert_close("swiglu d_gate", &dg, &dgr, 1e-5)?;
            let uv = Var::from_tensor(&u)?;
            let gt = g.as_tensor().detach();
            let (_, du) = grad_of(&uv, &c, |u| swiglu(&gt, u))?;
            let (_, dur) = grad_of(&uv, &c, |u| gt.silu()? * u)?;
            assert_close("swiglu d_up", &du, &dur, 1e-6)?;
        }
        Ok(())
    }
}
