//! Operations between a tracked input and a frozen (constant) operand whose backward returns
//! the input gradient only.
//!
//! candle's backward computes and stores a gradient for *both* operands of a matmul, a
//! multiply or an add, even when one is a constant: for a LoRA step that is a third of the
//! backward FLOPs and a weight-sized buffer per layer. Here the result is computed outside the
//! autograd graph and re-attached to the input through a custom op with a hand-written
//! input gradient.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, D,
};

static PROTECTION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the frozen-weight protection off (`false`: `frozen_linear` becomes a plain matmul
/// whose backward also computes and stores a weight gradient, as candle does by default).
/// For measuring what the protection saves; never needed otherwise.
pub fn set_weight_gradient_protection(enabled: bool) {
    PROTECTION.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether frozen-weight protection is on (see [`set_weight_gradient_protection`]).
pub fn weight_gradient_protection() -> bool {
    PROTECTION.load(std::sync::atomic::Ordering::Relaxed)
}

/// `y = x · Wᵀ` for `x: [.., in]`, `w: [out, in]`, with a gradient for `x` only.
///
/// `w` must not be a `Var` (it is treated as a constant; no gradient is ever computed for it).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !PROTECTION.load(std::sync::atomic::Ordering::Relaxed) {
        return matmul_t(x, w);
    }
    let y = matmul_t(&x.detach(), w)?;
    let w = w.clone();
    reattach(x, y, move |g| {
        let out_features = g.dim(D::Minus1)?;
        let in_dims = {
            let mut d = g.dims().to_vec();
            *d.last_mut().expect("rank >= 1") = w.dim(1)?;
            d
        };
        g.reshape(((), out_features))?
            .matmul(&w.to_dtype(g.dtype())?)?
            .reshape(in_dims)
    })
}

/// `x ⊙ c` with `c` broadcast to `x`'s shape (a norm weight, a RoPE table); gradient for `x` only.
pub fn mul_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_mul(c)?;
    if y.shape() != x.shape() {
        // x itself is broadcast: let candle's op reduce the gradient.
        return x.broadcast_mul(&c.detach());
    }
    let c = c.clone();
    reattach(x, y, move |g| g.broadcast_mul(&c.to_dtype(g.dtype())?))
}

/// `x + c` with `c` broadcast to `x`'s shape (an attention mask); gradient for `x` only.
pub fn add_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_add(c)?;
    if y.shape() != x.shape() {
        return x.broadcast_add(&c.detach());
    }
    reattach(x, y, |g| Ok(g.clone()))
}

/// Moves `t`'s buffer out of its storage when `t` is f32 on the CPU and spans exactly all of
/// it; `t` and every tensor sharing that storage are left empty (reading them afterwards
/// panics). For graph nodes whose values nothing reads again, kept only for their backward:
/// a block's packed adapters (the ops' forward has used the adapters themselves), a layer's
/// output once the next layer's leaf holds it. Elsewhere (`None`) the buffer stays.
pub fn take_f32_values(t: &Tensor) -> Result<Option<Vec<f32>>> {
    struct Take(Mutex<Option<Vec<f32>>>);
    impl candle_core::InplaceOp1 for Take {
        fn name(&self) -> &'static str {
            "take-values"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            if let CpuStorage::F32(values) = storage {
                if layout.contiguous_offsets() == Some((0, values.len())) {
                    *self.0.lock().expect("not poisoned") = Some(std::mem::take(values));
                }
            }
            Ok(())
        }
    }
    if !t.device().is_cpu() || t.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let take = Take(Mutex::new(None));
    t.inplace_op1(&take)?;
    Ok(take.0.into_inner().expect("not poisoned"))
}

type InputGrad = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;
type InputGrads2 = dyn Fn(&Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync;
type InputGrads3 = dyn Fn(&Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync;

/// Returns `y` (computed from `x` without a graph) as a function of `x` whose backward is
/// `input_grad(dy)`. The graph keeps `x` and the returned tensor, not `y` itself: on the CPU
/// in f32 the returned tensor takes over `y`'s buffer, so a tensor that shares `y`'s storage
/// must not be read afterwards (pass a fresh `y`); elsewhere it gets a copy.
pub fn reattach(
    x: &Tensor,
    y: Tensor,
    input_grad: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let y = y.contiguous()?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1_arc(Arc::new(Box::new(Reattach {
        result: Precomputed::new(y),
        input_grad: Box::new(input_grad),
    })))
}

/// [`reattach`] for a result of two inputs: `grads(dy, y)` returns their two gradients.
pub fn reattach2(
    (a, b): (&Tensor, &Tensor),
    y: Tensor,
    grads: impl Fn(&Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    let y = y.contiguous()?;
    if !(a.track_op() || b.track_op()) {
        return Ok(y);
    }
    a.apply_op2_arc(
        b,
        Arc::new(Box::new(Reattach2 {
            result: Precomputed::new(y),
            grads: Box::new(grads),
        })),
    )
}

/// [`reattach`] for a result of three inputs: `grads(dy, y)` returns their three gradients
/// (`y` is the returned tensor, for backwards that need the output).
pub fn reattach3(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    y: Tensor,
    grads: impl Fn(&Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    let y = y.contiguous()?;
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(y);
    }
    a.apply_op3_arc(
        b,
        c,
        Arc::new(Box::new(Reattach3 {
            result: Precomputed::new(y),
            grads: Box::new(grads),
        })),
    )
}

/// `x · Wᵀ` for any leading batch dims of `x`, as one 2-D matmul, differentiable in both
/// (a streaming row kernel when neither needs a gradient and `x` is a few f32 rows on the
/// CPU: decoding is bound by reading `W`).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let in_features = x.dim(D::Minus1)?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1 checked by dim") = w.dim(0)?;
    let rows = x.elem_count() / in_features.max(1);
    if rows < crate::GEMM_MIN_ROWS
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && !x.track_op()
        && !w.track_op()
    {
        let (storage, layout) = w.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let y =
                crate::ggml_matvec::matmul_t_f32(&xs, rows, in_features, &data[a..b], w.dim(0)?)
                    .map_err(candle_core::Error::msg)?;
            return Tensor::from_vec(y, out_dims, x.device());
        }
    }
    let x2 = x.reshape(((), in_features))?;
    x2.matmul(&w.t()?)?.reshape(out_dims)
}

/// A result computed before its op runs: the op's forward returns a copy of it and lets the
/// original go (a custom op cannot hand over a tensor's storage itself).
struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    fn new(y: Tensor) -> Self {
        Precomputed(Mutex::new(Some(y)))
    }

    fn take(&self) -> Result<Tensor> {
        match self.0.lock().expect("not poisoned").take() {
            Some(y) => Ok(y),
            None => candle_core::bail!("frozen-operand: the forward ran twice"),
        }
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        // The result's own buffer becomes the op's output: no copy, and no freed buffer of
        // the same size left behind in the heap between the activations kept for the backward.
        if let Some(values) = take_f32_values(&y)? {
            return Ok((CpuStorage::F32(values), y.shape().clone()));
        }
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            candle_core::bail!("frozen-operand: the result is not on the CPU")
        };
        Ok((copy_contiguous(s, layout)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("frozen-operand: the result is not on the GPU")
        };
        let dev = s.device().clone();
        // SAFETY: every element is written by the copy below.
        let mut dst = unsafe { dev.alloc_uninit(layout.shape(), s.dtype())? };
        s.copy_strided_src(&mut dst, 0, layout)?;
        Ok((dst, layout.shape().clone()))
    }
}

/// Forward: the precomputed result. Backward: `input_grad(dy)` for the input.
struct Reattach {
    result: Precomputed,
    input_grad: Box<InputGrad>,
}

impl CustomOp1 for Reattach {
    fn name(&self) -> &'static str {
        "frozen-operand"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.result.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _x_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.result.cuda()
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dx = (self.input_grad)(grad_res)?;
        debug_assert_eq!(dx.shape(), x.shape());
        Ok(Some(dx))
    }
}

/// [`Reattach`] with two inputs.
struct Reattach2 {
    result: Precomputed,
    grads: Box<InputGrads2>,
}

impl CustomOp2 for Reattach2 {
    fn name(&self) -> &'static str {
        "frozen-operand-2"
    }

    fn cpu_fwd(
        &self,
        _a: &CpuStorage,
        _al: &Layout,
        _b: &CpuStorage,
        _bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.result.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _a: &candle_core::CudaStorage,
        _al: &Layout,
        _b: &candle_core::CudaStorage,
        _bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.result.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = (self.grads)(grad_res, res)?;
        let keep = |t: &Tensor, d: Tensor| t.track_op().then_some(d);
        Ok((keep(a, da), keep(b, db)))
    }
}

/// [`Reattach`] with three inputs.
struct Reattach3 {
    result: Precomputed,
    grads: Box<InputGrads3>,
}

impl CustomOp3 for Reattach3 {
    fn name(&self) -> &'static str {
        "frozen-operand-3"
    }

    fn cpu_fwd(
        &self,
        _a: &CpuStorage,
        _al: &Layout,
        _b: &CpuStorage,
        _bl: &Layout,
        _c: &CpuStorage,
        _cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.result.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _a: &candle_core::CudaStorage,
        _al: &Layout,
        _b: &candle_core::CudaStorage,
        _bl: &Layout,
        _c: &candle_core::CudaStorage,
        _cl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.result.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db, dc) = (self.grads)(grad_res, res)?;
        let keep = |t: &Tensor, d: Tensor| t.track_op().then_some(d);
        Ok((keep(a, da), keep(b, db), keep(c, dc)))
    }
}

fn copy_contiguous(s: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
    use candle_core::backend::BackendStorage;
    // `reattach`/`reattach3` make the result contiguous before it gets here.
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("frozen-operand: expected a contiguous result")
    };
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
        other => candle_core::bail!("frozen-operand: unsupported dtype {:?}", other.dtype()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_equals_matmul_and_gradient_reaches_input_only() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 5), &dev)?;
        let w = Tensor::randn(0f32, 1., (4, 5), &dev)?;
        let y = frozen_linear(x.as_tensor(), &w)?;
        let reference = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");

        // loss = sum(y * c): dL/dx = c · W
        let c = Tensor::randn(0f32, 1., (2, 3, 4), &dev)?;
        let grads = (&y * &c)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).expect("gradient reaches x");
        let expected = c.broadcast_matmul(&w)?;
        let diff = (dx - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "dx differs by {diff}");
        assert!(grads.get(&w).is_none(), "no gradient for the frozen weight");
        Ok(())
    }

    #[test]
    fn const_ops_give_the_input_gradient_and_nothing_else() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 4), &dev)?;
        let w = Tensor::randn(0f32, 1., 4, &dev)?;
        let m = Tensor::randn(0f32, 1., (3, 4), &dev)?;
        let y = add_const(&mul_const(x.as_tensor(), &w)?, &m)?;
        let reference = x.as_tensor().broadcast_mul(&w)?.broadcast_add(&m)?;
        assert_eq!(
            (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0
        );
        let c = Tensor::randn(0f32, 1., (2, 3, 4), &dev)?;
        let grads = mul_const(&y, &c)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).expect("gradient reaches x");
        let diff = (dx - c.broadcast_mul(&w)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        assert_eq!(grads.get_ids().count(), 1, "only x has a gradient");
        Ok(())
    }

    #[test]
    fn only_a_whole_f32_buffer_is_taken() -> Result<()> {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let t = Tensor::from_vec(values.clone(), (3, 4), &dev)?;
        // A view of part of the buffer, or another dtype: nothing moves, values intact.
        let part = t.narrow(0, 1, 2)?;
        assert!(take_f32_values(&part)?.is_none());
        let wide = t.to_dtype(candle_core::DType::F64)?;
        assert!(take_f32_values(&wide)?.is_none());
        assert_eq!(part.flatten_all()?.to_vec1::<f32>()?, values[4..].to_vec());
        // The whole buffer moves out, once.
        assert_eq!(take_f32_values(&t)?, Some(values));
        assert!(take_f32_values(&t)?.is_none(), "a taken buffer is gone");
        Ok(())
    }

    /// The result of a re-attached op takes over `y`'s buffer instead of copying it: a tensor
    /// that shared `y`'s storage is left empty (the contract `reattach` documents), and the
    /// result holds `y`'s values.
    #[test]
    fn a_reattached_result_takes_over_the_buffer_of_y() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (3, 5), &dev)?;
        let y = Tensor::randn(0f32, 1., (3, 4), &dev)?;
        let expected = y.to_vec2::<f32>()?;
        let alias = y.clone();
        let r = reattach(x.as_tensor(), y, |g| {
            g.matmul(&Tensor::ones((4, 5), g.dtype(), g.device())?)
        })?;
        assert!(
            take_f32_values(&alias)?.is_none(),
            "y's buffer moved to the result"
        );
        assert_eq!(r.to_vec2::<f32>()?, expected);
        Ok(())
    }

    #[test]
    fn matmul_t_keeps_the_gradient_of_a_trainable_weight_for_few_rows() -> Result<()> {
        // A constant single-row input takes the row-kernel path only when W is constant too.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 5), &dev)?;
        let w = Var::randn(0f32, 1., (4, 5), &dev)?;
        let y = matmul_t(&x, w.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        let dw = grads.get(w.as_tensor()).expect("W gets a gradient");
        let expected = x.broadcast_as((4, 5))?;
        assert_eq!((dw - expected)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn no_graph_when_input_is_constant() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 5), &dev)?;
        let w = Tensor::randn(0f32, 1., (4, 5), &dev)?;
        let y = frozen_linear(&x, &w)?;
        assert!(!y.track_op());
        assert_eq!(y.dims(), &[3, 4]);
        Ok(())
    }
}
