//! Rotary position embeddings in the Hugging Face "rotate half" layout:
//! `y = x ⊙ cos + rotate_half(x) ⊙ sin` with `rotate_half([x1, x2]) = [−x2, x1]`.
//!
//! The map is linear in `x`, so the backward is the transposed rotation applied to `dy`
//! (`dx = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin)`, `rotate_halfᵀ([u1, u2]) = [u2, −u1]`): one kernel
//! with a flag does both. The tables are constants (no gradient).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::common::{cpu_dtype, dispatch_float, slice};

/// RoPE for `x: [b, heads, t, d]` with tables `cos, sin: [t, d]` or `[b or 1, 1, t, d]`
/// (broadcast over heads).
///
/// `x` may be a transposed view (`[b, t, heads, d]` viewed as `[b, heads, t, d]`) as long as
/// its last dimension is contiguous: no copy is made. Output: contiguous `[b, heads, t, d]`,
/// `x`'s dtype (tables are cast to it). Only `x` gets a gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_with(x, cos, sin, false)
}

/// The backward of [`rope`] for its output gradient `dy` (the transposed rotation), without a
/// graph: contiguous `[b, heads, t, d]`.
pub(crate) fn rope_transposed(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_with(&dy.detach(), cos, sin, true)
}

fn rope_with(x: &Tensor, cos: &Tensor, sin: &Tensor, transpose: bool) -> Result<Tensor> {
    let (b, _h, t, d) = x.dims4()?;
    if d % 2 != 0 {
        bail!("rope: head dim {d} is odd")
    }
    let dtype = x.dtype();
    let compute = cpu_dtype(x.device(), dtype);
    let tables = |c: &Tensor| -> Result<Tensor> {
        let c = match c.dims() {
            [tt, dd] if (*tt, *dd) == (t, d) => c.reshape((1, t, d))?,
            [bb, 1, tt, dd] if (*bb == b || *bb == 1) && (*tt, *dd) == (t, d) => {
                c.reshape((*bb, t, d))?
            }
            other => bail!("rope: table shape {other:?} does not fit x {:?}", x.dims()),
        };
        c.detach().to_dtype(compute)?.contiguous()
    };
    let x = x.to_dtype(compute)?;
    let x = if x.stride()[3] == 1 {
        x
    } else {
        x.contiguous()?
    };
    let y = x.apply_op3(&tables(cos)?, &tables(sin)?, Rope { transpose })?;
    y.to_dtype(dtype)
}

/// `transpose: false` applies the rotation, `true` its transpose (the backward).
struct Rope {
    transpose: bool,
}

/// The geometry of one call, shared by the CPU and CUDA paths.
pub(crate) struct RopeDims {
    pub b: usize,
    pub h: usize,
    pub t: usize,
    pub d: usize,
    /// Element strides of x over (b, h, t) and its start offset.
    pub xs: [usize; 3],
    pub x_off: usize,
    /// Whether the tables have one row block per batch entry (else shared).
    pub per_batch: bool,
}

impl RopeDims {
    fn new(xl: &Layout, cl: &Layout) -> Result<Self> {
        let &[b, h, t, d] = xl.dims() else {
            bail!("rope: x must be rank 4")
        };
        let s = xl.stride();
        if s[3] != 1 || !cl.is_contiguous() {
            bail!("rope: unsupported layout")
        }
        Ok(RopeDims {
            b,
            h,
            t,
            d,
            xs: [s[0], s[1], s[2]],
            x_off: xl.start_offset(),
            per_batch: cl.dims()[0] == b && b > 1,
        })
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "peft-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(
            x: &[T],
            cos: &[T],
            sin: &[T],
            g: &RopeDims,
            transpose: bool,
        ) -> CpuStorage {
            let (t, d, half) = (g.t, g.d, g.d / 2);
            let mut y = vec![T::zero(); g.b * g.h * t * d];
            // One task per (batch, head): t rows of d.
            y.par_chunks_mut(t * d).enumerate().for_each(|(bh, yb)| {
                let (bi, hi) = (bh / g.h, bh % g.h);
                let tab = if g.per_batch { bi * t * d } else { 0 };
                for (ti, yr) in yb.chunks_exact_mut(d).enumerate() {
                    let xo = g.x_off + bi * g.xs[0] + hi * g.xs[1] + ti * g.xs[2];
                    let xr = &x[xo..xo + d];
                    let c = &cos[tab + ti * d..tab + ti * d + d];
                    let s = &sin[tab + ti * d..tab + ti * d + d];
                    let (y1, y2) = yr.split_at_mut(half);
                    let (x1, x2) = xr.split_at(half);
                    if transpose {
                        for i in 0..half {
                            y1[i] = x1[i] * c[i] + x2[i] * s[half + i];
                            y2[i] = x2[i] * c[half + i] - x1[i] * s[i];
                        }
                    } else {
                        for i in 0..half {
                            y1[i] = x1[i] * c[i] - x2[i] * s[i];
                            y2[i] = x2[i] * c[half + i] + x1[i] * s[half + i];
                        }
                    }
                }
            });
            T::to_cpu_storage_owned(y)
        }
        let g = RopeDims::new(xl, cl)?;
        let op = self.name();
        let s = dispatch_float!(
            op,
            x.dtype(),
            run(
                match_slice(x)?,
                slice(cos, cl, op)?,
                slice(sin, sl, op)?,
                &g,
                self.transpose
            )
        );
        Ok((s, Shape::from((g.b, g.h, g.t, g.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        cos: &candle_core::CudaStorage,
        cl: &Layout,
        sin: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = RopeDims::new(xl, cl)?;
        let y = crate::cuda::rope(x, cos, cl, sin, sl, &g, self.transpose)?;
        Ok((y, Shape::from((g.b, g.h, g.t, g.d))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = if dy.stride()[3] == 1 {
            dy.clone()
        } else {
            dy.contiguous()?
        };
        let dx = dy.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                transpose: !self.transpose,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// The whole storage as a slice (x is addressed through its own strides and offset).
fn match_slice<T: WithDType>(s: &CpuStorage) -> Result<&[T]> {
    T::cpu_storage_as_slice(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grad_of};
    use candle_core::{DType, Device, Var, D};

    fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
    }

    fn tables(b: usize, t: usize, d: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        // Arbitrary (not HF-symmetric) tables, so both halves' indexing is tested.
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 2., (b, 1, t, d), &dev)?.to_dtype(dtype)?;
        Ok((a.cos()?, a.sin()?))
    }

    #[test]
    fn matches_the_composition_for_per_batch_and_shared_tables() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let (b, h, t, d) = (2, 3, 5, 8);
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(dtype)?)?;
            let c = Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(dtype)?;
            let (cos, sin) = tables(b, t, d, dtype)?;
            let (y, dx) = grad_of(&x, &c, |x| rope(x, &cos, &sin))?;
            let (yr, dxr) = grad_of(&x, &c, |x| reference(x, &cos, &sin))?;
            assert_close("rope y", &y, &yr, 1e-6)?;
            assert_close("rope dx", &dx, &dxr, 1e-6)?;

            let (cos, sin) = tables(1, t, d, dtype)?;
            let (cos2, sin2) = (cos.reshape((t, d))?, sin.reshape((t, d))?);
            let (y, dx) = grad_of(&x, &c, |x| rope(x, &cos2, &sin2))?;
            let (yr, dxr) = grad_of(&x, &c, |x| reference(x, &cos, &sin))?;
            assert_close("rope shared y", &y, &yr, 1e-6)?;
            assert_close("rope shared dx", &dx, &dxr, 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn a_transposed_view_needs_no_copy_and_gives_the_same_result() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 4, 6);
        // [b, t, h, d] as the projections produce it, viewed as [b, h, t, d].
        let x = Var::randn(0f32, 1., (b, t, h, d), &dev)?;
        let c = Tensor::randn(0f32, 1., (b, h, t, d), &dev)?;
        let (cos, sin) = tables(b, t, d, DType::F32)?;
        let view = |x: &Tensor| x.transpose(1, 2);
        let (y, dx) = grad_of(&x, &c, |x| rope(&view(x)?, &cos, &sin))?;
        let (yr, dxr) = grad_of(&x, &c, |x| reference(&view(x)?.contiguous()?, &cos, &sin))?;
        assert!(y.is_contiguous());
        assert_close("rope view y", &y, &yr, 1e-6)?;
        assert_close("rope view dx", &dx, &dxr, 1e-6)
    }
}
