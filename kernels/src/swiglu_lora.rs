//! The MLP's down projection with LoRA applied straight to `silu(gate) ⊙ up`:
//! `y = h·Wᵀ + s·(h·Aᵀ)·Bᵀ` with `h = silu(gate) ⊙ up`, as one op.
//!
//! Composed from [`crate::swiglu`] and [`crate::lora_linear`], the graph keeps `gate`, `up`
//! (for SwiGLU's backward) and also `h` (for `dA = uᵀ·h`): a third `[tokens, intermediate]`
//! tensor per layer: the SmolLM2 step at 1,024 tokens peaked 170 MB lower without it. This op keeps only
//! `gate`, `up` and `h·Aᵀ`, and recomputes `h` in its backward (one elementwise pass).
//! A and B travel as one flat tensor (a custom op has three inputs), which costs a copy of the
//! adapter's few weights per call.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

use crate::common::cpu_dtype;
use crate::lora::{FrozenOperand, LoraLinear};
use crate::swiglu::SWIGLU;

/// `(silu(gate) ⊙ up)·Wᵀ + scale·((silu(gate) ⊙ up)·Aᵀ)·Bᵀ` for `gate, up: [.., k]`,
/// `w: [n, k]` (frozen), `a: [r, k]`, `b: [n, r]`. Returns `[.., n]` in `gate`'s dtype.
/// Gradients as the composition: `gate`, `up`, `a`, `b`; never `w`.
pub fn swiglu_lora_linear(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if w.dtype() != gate.dtype() {
        bail!(
            "swiglu_lora_linear: w is {:?}, gate is {:?}",
            w.dtype(),
            gate.dtype()
        )
    }
    swiglu_lora_linear_with(gate, up, FrozenOperand::dense(w), w.dims2()?, a, b, scale)
}

/// [`swiglu_lora_linear`] with the frozen weight as a [`FrozenOperand`] of shape
/// `w_dims = (out, in)` (see [`crate::lora::lora_linear_with`]).
pub fn swiglu_lora_linear_with(
    gate: &Tensor,
    up: &Tensor,
    w: FrozenOperand,
    (n, kw): (usize, usize),
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let k = gate.dim(D::Minus1)?;
    let (r, ka) = a.dims2()?;
    let (nb, rb) = b.dims2()?;
    if gate.shape() != up.shape()
        || gate.dtype() != up.dtype()
        || kw != k
        || ka != k
        || nb != n
        || rb != r
    {
        bail!(
            "swiglu_lora_linear: gate {:?} {:?}, up {:?} {:?}, w {:?}, a {:?}, b {:?} do not fit",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype(),
            (n, kw),
            a.dims(),
            b.dims()
        )
    }
    let dtype = gate.dtype();
    let compute = cpu_dtype(gate.device(), dtype);
    let mut out_dims = gate.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    let flat = |t: &Tensor| t.to_dtype(compute)?.reshape(((), k))?.contiguous();
    let ab = Tensor::cat(
        &[
            a.to_dtype(compute)?.flatten_all()?,
            b.to_dtype(compute)?.flatten_all()?,
        ],
        0,
    )?;
    let op = SwiGluLora {
        lora: LoraLinear {
            w: w.in_dtype(compute)?,
            scale,
            xa: Mutex::new(None),
        },
        r,
        k,
        n,
    };
    flat(gate)?
        .apply_op3(&flat(up)?, &ab, op)?
        .reshape(out_dims)?
        .to_dtype(dtype)
}

/// `swiglu_lora_linear` for 2-D contiguous f32-or-compute-dtype operands without a graph,
/// returning the LoRA product's state as well (its `h·Aᵀ` kept from the forward), for fused
/// blocks that run the backward themselves.
pub(crate) fn swiglu_lora_forward(
    gate: &Tensor,
    up: &Tensor,
    lora: LoraLinear,
    a: &Tensor,
    b: &Tensor,
) -> Result<(Tensor, LoraLinear)> {
    let (r, k) = a.dims2()?;
    let n = b.dim(0)?;
    let ab = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?;
    let op = SwiGluLora { lora, r, k, n };
    let y = gate
        .contiguous()?
        .apply_op3_no_bwd(&up.contiguous()?, &ab, &op)?;
    Ok((y, op.lora))
}

struct SwiGluLora {
    lora: LoraLinear,
    r: usize,
    k: usize,
    n: usize,
}

impl SwiGluLora {
    /// Where A (`[r, k]`) and B (`[n, r]`) lie in the flat adapter tensor.
    fn adapter_layouts(&self, abl: &Layout) -> (Layout, Layout) {
        let at = abl.start_offset();
        (
            Layout::contiguous_with_offset((self.r, self.k), at),
            Layout::contiguous_with_offset((self.n, self.r), at + self.r * self.k),
        )
    }
}

impl CustomOp3 for SwiGluLora {
    fn name(&self) -> &'static str {
        "peft-swiglu-lora-linear"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        ab: &CpuStorage,
        abl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // `h` lives only for the two products.
        let (h, shape) = SWIGLU.cpu_fwd(g, gl, u, ul)?;
        let (al, bl) = self.adapter_layouts(abl);
        self.lora
            .cpu_fwd(&h, &Layout::contiguous(shape), ab, &al, ab, &bl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        ab: &candle_core::CudaStorage,
        abl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (h, shape) = SWIGLU.cuda_fwd(g, gl, u, ul)?;
        let (al, bl) = self.adapter_layouts(abl);
        self.lora
            .cuda_fwd(&h, &Layout::contiguous(shape), ab, &al, ab, &bl)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        ab: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, k, n) = (self.r, self.k, self.n);
        let h = g.detach().apply_op2_no_bwd(&u.detach(), &SWIGLU)?;
        let a = ab.narrow(0, 0, r * k)?.reshape((r, k))?;
        let b = ab.narrow(0, r * k, n * r)?.reshape((n, r))?;
        let inputs_tracked = g.track_op() || u.track_op();
        let (dh, da, db) = self.lora.grads(
            &h,
            &a,
            &b,
            dy,
            (inputs_tracked, ab.track_op(), ab.track_op()),
        )?;
        let (dg, du) = match dh {
            Some(dh) => SWIGLU.bwd(g, u, &h, &dh)?,
            None => (None, None),
        };
        let dab = match (da, db) {
            (Some(da), Some(db)) => Some(Tensor::cat(&[da.flatten_all()?, db.flatten_all()?], 0)?),
            _ => None,
        };
        Ok((dg, du, dab))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_swiglu_then_lora_with_gradients_for_gate_up_a_b() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let (k, n, r) = (37, 29, 4);
            let v = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype)?);
            let gate = v(Tensor::randn(0f32, 2., (2, 5, k), &dev)?)?;
            let up = v(Tensor::randn(0f32, 1., (2, 5, k), &dev)?)?;
            let w = v(Tensor::randn(0f32, 0.2, (n, k), &dev)?)?;
            let a = v(Tensor::randn(0f32, 0.2, (r, k), &dev)?)?;
            let b = v(Tensor::randn(0f32, 0.2, (n, r), &dev)?)?;
            let c = Tensor::randn(0f32, 1., (2, 5, n), &dev)?.to_dtype(dtype)?;
            let y = swiglu_lora_linear(&gate, &up, &w, &a, &b, 2.0)?;
            let g = (&y * &c)?.sum_all()?.backward()?;
            // The plain composition, candle ops only.
            let h = (gate.silu()? * up.as_tensor())?;
            let yr = (h.broadcast_matmul(&w.t()?)?
                + (h.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * 2.0)?)?;
            let gr = (&yr * &c)?.sum_all()?.backward()?;
            assert_close("y", &y, &yr, 1e-5)?;
            for (name, t) in [("d_gate", &gate), ("d_up", &up), ("dA", &a), ("dB", &b)] {
                let got = g.get(t).expect("gradient");
                assert_close(name, got, gr.get(t).expect("reference gradient"), 1e-5)?;
            }
            assert!(g.get(&w).is_none(), "no gradient for the frozen weight");
        }
        Ok(())
    }

    #[test]
    fn frozen_adapter_still_passes_the_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let gate = Var::randn(0f32, 1., (6, 8), &dev)?;
        let up = Tensor::randn(0f32, 1., (6, 8), &dev)?;
        let w = Tensor::randn(0f32, 1., (5, 8), &dev)?;
        let (a, b) = (
            Tensor::randn(0f32, 1., (2, 8), &dev)?,
            Tensor::randn(0f32, 1., (5, 2), &dev)?,
        );
        let g = swiglu_lora_linear(&gate, &up, &w, &a, &b, 0.5)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&gate).is_some());
        Ok(())
    }

    #[test]
    fn shapes_are_checked() {
        let dev = Device::Cpu;
        let t = |s: (usize, usize)| Tensor::zeros(s, DType::F32, &dev).unwrap();
        assert!(swiglu_lora_linear(
            &t((3, 8)),
            &t((3, 7)),
            &t((5, 8)),
            &t((2, 8)),
            &t((5, 2)),
            1.0
        )
        .is_err());
        assert!(swiglu_lora_linear(
            &t((3, 8)),
            &t((3, 8)),
            &t((5, 8)),
            &t((2, 8)),
            &t((4, 2)),
            1.0
        )
        .is_err());
    }
}
