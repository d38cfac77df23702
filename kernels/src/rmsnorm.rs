//! RMSNorm with a frozen weight: `y = w ⊙ x / sqrt(mean(x²) + eps)` over the last dimension.
//!
//! The backward gives `dx` only (the model never trains norm weights), in one pass per row:
//! with `r = 1/sqrt(mean(x²)+eps)` and `g = w ⊙ dy`, `dx = r·g − x·r³·(g·x)/d`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::common::{cpu_dtype, dispatch_float, rows_per_task, slice, Float};

/// RMSNorm over the last dimension of `x: [.., d]` with `weight: [d]` (a constant).
///
/// Any float dtype (CPU computes f16/bf16 in f32); the weight is cast to `x`'s dtype. The
/// result has `x`'s shape and dtype; only `x` gets a gradient.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] {
        candle_core::bail!(
            "rms_norm: weight {:?} does not match x {:?}",
            weight.dims(),
            x.dims()
        )
    }
    let dtype = x.dtype();
    let compute = cpu_dtype(x.device(), dtype);
    let xc = x.to_dtype(compute)?.contiguous()?;
    let w = weight.detach().to_dtype(compute)?.contiguous()?;
    let y = xc.apply_op2(&w, RmsNorm { eps })?;
    y.to_dtype(dtype)
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "peft-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], w: &[T], eps: f64) -> CpuStorage {
            let d = w.len();
            let mut y = vec![T::zero(); x.len()];
            let eps = T::from_f64(eps);
            let inv_d = T::from_f64(1.0 / d as f64);
            y.par_chunks_mut(d * rows_per_task(d))
                .zip(x.par_chunks(d * rows_per_task(d)))
                .for_each(|(yb, xb)| {
                    for (yr, xr) in yb.chunks_exact_mut(d).zip(xb.chunks_exact(d)) {
                        let r = inv_rms(xr, inv_d, eps);
                        for ((yi, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                            *yi = wi * (xi * r);
                        }
                    }
                });
            T::to_cpu_storage_owned(y)
        }
        let op = self.name();
        let s = dispatch_float!(
            op,
            x.dtype(),
            run(slice(x, xl, op)?, slice(w, wl, op)?, self.eps)
        );
        Ok((s, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = wl.shape().elem_count();
        let rows = xl.shape().elem_count() / d;
        let y = crate::cuda::rms_norm_fwd(x, xl, w, wl, rows, d, self.eps as f32)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rms_norm_backward(x, w, dy, self.eps)?), None))
    }
}

/// The input gradient of `rms_norm(x, w, eps)` for `dy`, without a graph.
pub(crate) fn rms_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps })
}

/// `dx` from `(x, w, dy)`.
struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "peft-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], w: &[T], dy: &[T], eps: f64) -> CpuStorage {
            let d = w.len();
            let mut dx = vec![T::zero(); x.len()];
            let eps = T::from_f64(eps);
            let inv_d = T::from_f64(1.0 / d as f64);
            let block = d * rows_per_task(d);
            dx.par_chunks_mut(block)
                .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
                .for_each(|(db, (xb, gb))| {
                    for ((dr, xr), gr) in db
                        .chunks_exact_mut(d)
                        .zip(xb.chunks_exact(d))
                        .zip(gb.chunks_exact(d))
                    {
                        let r = inv_rms(xr, inv_d, eps);
                        let mut dot = T::zero();
                        for ((&xi, &gi), &wi) in xr.iter().zip(gr).zip(w) {
                            dot += gi * wi * xi;
                        }
                        let c = r * r * r * dot * inv_d;
                        for (((di, &xi), &gi), &wi) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
                            *di = r * gi * wi - c * xi;
                        }
                    }
                });
            T::to_cpu_storage_owned(dx)
        }
        let op = self.name();
        let s = dispatch_float!(
            op,
            x.dtype(),
            run(
                slice(x, xl, op)?,
                slice(w, wl, op)?,
                slice(dy, dyl, op)?,
                self.eps
            )
        );
        Ok((s, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = wl.shape().elem_count();
        let rows = xl.shape().elem_count() / d;
        let dx = crate::cuda::rms_norm_bwd(x, xl, w, wl, dy, dyl, rows, d, self.eps as f32)?;
        Ok((dx, xl.shape().clone()))
    }
}

#[inline]
fn inv_rms<T: Float>(x: &[T], inv_d: T, eps: T) -> T {
    let mut ss = T::zero();
    for &v in x {
        ss += v * v;
    }
    T::one() / (ss * inv_d + eps).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grad_of};
    use candle_core::{DType, Device, Var};

    fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(w)
    }

    #[test]
    fn matches_the_composition_forward_and_backward() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let dev = Device::Cpu;
            let x = Var::randn(0f32, 1., (3, 5, 67), &dev)?
                .as_tensor()
                .to_dtype(dtype)?;
            let x = Var::from_tensor(&x)?;
            let w = Tensor::randn(1f32, 0.3, 67, &dev)?.to_dtype(dtype)?;
            let c = Tensor::randn(0f32, 1., (3, 5, 67), &dev)?.to_dtype(dtype)?;
            let (y, dx) = grad_of(&x, &c, |x| rms_norm(x, &w, 1e-5))?;
            let (y_ref, dx_ref) = grad_of(&x, &c, |x| reference(x, &w, 1e-5))?;
            assert_close("rms_norm y", &y, &y_ref, 1e-5)?;
            assert_close("rms_norm dx", &dx, &dx_ref, 1e-5)?;
        }
        Ok(())
    }

    #[test]
    fn no_gradient_for_the_weight_even_if_it_is_a_var() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (4, 8), &dev)?;
        let w = Var::randn(0f32, 1., 8, &dev)?;
        let grads = rms_norm(&x, &w, 1e-6)?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn bf16_input_is_computed_in_f32_and_returned_in_bf16() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 16), &dev)?;
        let w = Tensor::ones(16, DType::F32, &dev)?;
        let y = rms_norm(&x.to_dtype(DType::BF16)?, &w, 1e-6)?;
        assert_eq!(y.dtype(), DType::BF16);
        assert_close(
            "bf16",
            &y.to_dtype(DType::F32)?,
            &reference(&x, &w, 1e-6)?,
            1e-2,
        )
    }
}
