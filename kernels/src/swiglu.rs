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
    gated(gate, up, Gate::Silu)
}

/// `gelu_tanh(gate) ⊙ up` (Gemma's GeGLU, GELU's tanh approximation) with an exact backward
/// (candle's `gelu` backward rounds its constants to six digits). Off the CPU: candle's ops.
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() {
        return gate.gelu()? * up;
    }
    gated(gate, up, Gate::GeluTanh)
}

/// The activation on the gate of a gated linear unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Silu,
    GeluTanh,
}

impl Gate {
    /// `(act(g), act'(g))`.
    #[inline(always)]
    fn eval<T: Float>(self, g: T) -> (T, T) {
        let one = T::one();
        match self {
            Gate::Silu => {
                let sig = one / (one + (-g).exp());
                let silu = g * sig;
                (silu, sig + silu * (one - sig))
            }
            Gate::GeluTanh => {
                // 0.5·g·(1 + tanh(z)), z = √(2/π)·(g + 0.044715·g³); tanh from exp.
                let c = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
                let a = T::from_f64(0.044715);
                let half = T::from_f64(0.5);
                let two = T::from_f64(2.0);
                let z = c * (g + a * g * g * g);
                let t = one - two / ((two * z).exp() + one);
                let dz = c * (one + T::from_f64(3.0) * a * g * g);
                (
                    half * g * (one + t),
                    half * (one + t) + half * g * (one - t * t) * dz,
                )
            }
        }
    }
}

fn gated(gate: &Tensor, up: &Tensor, act: Gate) -> Result<Tensor> {
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
    g.apply_op2(&u, GatedUnit(act))?.to_dtype(dtype)
}

const BLOCK: usize = 4096;

/// `act(g) ⊙ u`, the activation a closure so that each one gets its own (vectorised) loop.
fn gated_forward<T: Float>(g: &[T], u: &[T], act: impl Fn(T) -> T + Sync) -> CpuStorage {
    let mut h = vec![T::zero(); g.len()];
    h.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK).zip(u.par_chunks(BLOCK)))
        .for_each(|(hb, (gb, ub))| {
            for ((h, &g), &u) in hb.iter_mut().zip(gb).zip(ub) {
                *h = act(g) * u;
            }
        });
    T::to_cpu_storage_owned(h)
}

/// `act(gate) ⊙ up` as one op.
pub(crate) struct GatedUnit(pub Gate);

/// The SwiGLU op.
pub(crate) const SWIGLU: GatedUnit = GatedUnit(Gate::Silu);

impl CustomOp2 for GatedUnit {
    fn name(&self) -> &'static str {
        match self.0 {
            Gate::Silu => "peft-swiglu",
            Gate::GeluTanh => "peft-geglu",
        }
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(g: &[T], u: &[T], act: Gate) -> CpuStorage {
            // One loop per activation: a `match` inside the element loop kept it from
            // vectorising (SwiGLU's forward lost ~1% of decoding time).
            match act {
                Gate::Silu => gated_forward(g, u, |g| g / (T::one() + (-g).exp())),
                Gate::GeluTanh => gated_forward(g, u, |g| Gate::GeluTanh.eval(g).0),
            }
        }
        let op = self.name();
        let act = self.0;
        let s = dispatch_float!(
            op,
            g.dtype(),
            run(slice(g, gl, op)?, slice(u, ul, op)?, act)
        );
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
        if self.0 != Gate::Silu {
            candle_core::bail!(
                "{} has no CUDA kernel (geglu composes candle's ops there)",
                self.name()
            )
        }
        Ok((crate::cuda::swiglu_fwd(g, gl, u, ul)?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = gated_backward(g, u, dh, self.0)?;
        Ok((Some(dg), Some(du)))
    }
}

/// `(d_gate, d_up)` for `h = silu(gate) ⊙ up` and `dh`, without a graph.
pub(crate) fn swiglu_backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    gated_backward(g, u, dh, Gate::Silu)
}

/// [`swiglu_backward`] over the activations' own buffers: `g` becomes `d_gate` and `u`
/// becomes `d_up` (each element reads its `g`, `u` and `dh` before writing), so the backward
/// allocates nothing.
pub(crate) fn swiglu_backward_in_place(g: &mut [f32], u: &mut [f32], dh: &[f32]) {
    g.par_chunks_mut(BLOCK)
        .zip(u.par_chunks_mut(BLOCK))
        .zip(dh.par_chunks(BLOCK))
        .for_each(|((gb, ub), dhb)| {
            for ((g, u), &dh) in gb.iter_mut().zip(ub.iter_mut()).zip(dhb) {
                let (a, da) = Gate::Silu.eval(*g);
                let d_gate = dh * *u * da;
                *u = dh * a;
                *g = d_gate;
            }
        });
}

fn gated_backward(g: &Tensor, u: &Tensor, dh: &Tensor, act: Gate) -> Result<(Tensor, Tensor)> {
    let both = g.apply_op3_no_bwd(u, &dh.contiguous()?, &GatedUnitBwd(act))?;
    Ok((
        both.get(0)?.reshape(g.shape())?,
        both.get(1)?.reshape(u.shape())?,
    ))
}

/// `[d_gate, d_up]` stacked, from `(gate, up, dh)`.
struct GatedUnitBwd(Gate);

impl CustomOp3 for GatedUnitBwd {
    fn name(&self) -> &'static str {
        match self.0 {
            Gate::Silu => "peft-swiglu-bwd",
            Gate::GeluTanh => "peft-geglu-bwd",
        }
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
        fn run<T: Float>(g: &[T], u: &[T], dh: &[T], act: Gate) -> CpuStorage {
            match act {
                Gate::Silu => gated_backward_with(g, u, dh, |g| Gate::Silu.eval(g)),
                Gate::GeluTanh => gated_backward_with(g, u, dh, |g| Gate::GeluTanh.eval(g)),
            }
        }
        fn gated_backward_with<T: Float>(
            g: &[T],
            u: &[T],
            dh: &[T],
            eval: impl Fn(T) -> (T, T) + Sync,
        ) -> CpuStorage {
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
                        let (a, da) = eval(g);
                        dub[i] = dh * a;
                        dgb[i] = dh * u * da;
                    }
                });
            T::to_cpu_storage_owned(out)
        }
        let op = self.name();
        let s = dispatch_float!(
            op,
            g.dtype(),
            run(
                slice(g, gl, op)?,
                slice(u, ul, op)?,
                slice(dh, dhl, op)?,
                self.0
            )
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
        if self.0 != Gate::Silu {
            candle_core::bail!("{} has no CUDA kernel", self.name())
        }
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

    /// Over the activations' own buffers, exactly what the allocating backward gives
    /// (a length that is not a multiple of the parallel block, too).
    #[test]
    fn in_place_backward_equals_the_allocating_one() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * super::BLOCK + 37;
        let g = Tensor::randn(0f32, 3., n, &dev)?;
        let u = Tensor::randn(0f32, 1., n, &dev)?;
        let dh = Tensor::randn(0f32, 1., n, &dev)?;
        let (dg, du) = swiglu_backward(&g, &u, &dh)?;
        let (mut gv, mut uv) = (g.to_vec1::<f32>()?, u.to_vec1::<f32>()?);
        swiglu_backward_in_place(&mut gv, &mut uv, &dh.to_vec1::<f32>()?);
        assert_eq!(gv, dg.to_vec1::<f32>()?);
        assert_eq!(uv, du.to_vec1::<f32>()?);
        Ok(())
    }

    /// GeGLU against the formula composed in f64 (exact constants), both gradients.
    #[test]
    fn geglu_matches_the_exact_composition() -> Result<()> {
        let dev = Device::Cpu;
        let gelu = |g: &Tensor| -> Result<Tensor> {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let inner = ((g + (g.powf(3.0)? * 0.044715)?)? * c)?;
            (g * 0.5)? * (inner.tanh()? + 1.0)?
        };
        let g = Var::from_tensor(&Tensor::randn(0f64, 3., (3, 4, 37), &dev)?)?;
        let u = Tensor::randn(0f64, 1., (3, 4, 37), &dev)?;
        let c = Tensor::randn(0f64, 1., (3, 4, 37), &dev)?;
        let (h, dg) = grad_of(&g, &c, |g| geglu(g, &u))?;
        let (hr, dgr) = grad_of(&g, &c, |g| gelu(g)? * &u)?;
        assert_close("geglu h", &h, &hr, 1e-12)?;
        assert_close("geglu d_gate", &dg, &dgr, 1e-12)?;
        let uv = Var::from_tensor(&u)?;
        let gt = g.as_tensor().detach();
        let (_, du) = grad_of(&uv, &c, |u| geglu(&gt, u))?;
        let (_, dur) = grad_of(&uv, &c, |u| gelu(&gt)? * u)?;
        assert_close("geglu d_up", &du, &dur, 1e-12)?;
        // f32 agrees with candle's forward.
        let g32 = g.as_tensor().to_dtype(DType::F32)?;
        let u32 = u.to_dtype(DType::F32)?;
        assert_close(
            "geglu f32",
            &geglu(&g32, &u32)?,
            &(g32.gelu()? * &u32)?,
            1e-5,
        )?;
        Ok(())
    }
}
