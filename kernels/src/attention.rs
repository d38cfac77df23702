//! Scaled dot-product attention that keeps only its inputs, its output and one log-sum-exp
//! per query for the backward, instead of the five `[queries, keys]` tensors that candle's
//! graph of `matmul → scale → mask → softmax` keeps (that chain was half of a training step's
//! activation memory on SmolLM2). The backward recomputes the probabilities from the
//! log-sum-exp, as FlashAttention does:
//!
//! ```text
//! P  = exp(S − lse)            S = scale · Q·Kᵀ + mask
//! dV = Pᵀ·dO     dP = dO·Vᵀ     D = rowsum(dO ⊙ O)     dS = P ⊙ (dP − D)
//! dQ = scale · dS·K             dK = scale · dSᵀ·Q
//! ```
//!
//! Built from candle tensor ops on detached tensors, so it runs on every device; the scores are
//! computed in f32 for bf16/f16 inputs.

use candle_core::{DType, Result, Tensor, D};

use crate::softmax;

/// `softmax(scale · q·kᵀ + mask) · v` with grouped-query heads.
///
/// * `q`: `[b, kv_heads, groups · t, d]` (query head `h` of kv group `h / groups`, its `t` rows
///   contiguous), `k`, `v`: `[b, kv_heads, s, d]`;
/// * `mask`: additive, `[b or 1, 1, t, s]`, the same for every head (finite: `f32::MIN` for
///   masked keys, so a fully masked row stays finite);
///
/// returns `[b, t, kv_heads · groups · d]` (heads side by side, the layout the output
/// projection reads) in `v`'s dtype, with gradients for `q`, `k` and `v`. The backward reads
/// q, k, v (kept by the graph anyway) and this output: no packed copy of the inputs, and no
/// second copy of the output in the heads-first layout.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    groups: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, kv_heads, gt, d) = q.dims4()?;
    let (kb, kh, s, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, kv_heads, d) || v.dims() != k.dims() || groups == 0 || gt % groups != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} with {groups} groups do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let ctx = Context {
        q: q.detach(),
        k: k.detach(),
        v: v.detach(),
        mask: mask.map(Tensor::detach),
        groups,
        scale,
        acc: accumulation(q.dtype()),
        s,
    };
    let (probs, lse) = ctx.probs_and_lse()?;
    let t = gt / groups;
    let out = ctx.heads_last(&probs.to_dtype(v.dtype())?.matmul(&ctx.v)?, t)?;
    drop(probs);
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    crate::frozen::reattach3((q, k, v), out, move |d_out, out| {
        ctx.backward(out, &lse, d_out)
    })
}

fn accumulation(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

struct Context {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Option<Tensor>,
    groups: usize,
    scale: f64,
    acc: DType,
    s: usize,
}

impl Context {
    /// `[b, kv_heads, groups · t, d]` → `[b, t, kv_heads · groups · d]` (a copy).
    fn heads_last(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let (b, kv_heads, gt, d) = x.dims4()?;
        let heads = kv_heads * gt / t;
        x.reshape((b, heads, t, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, heads * d))
    }

    /// The inverse of [`heads_last`](Self::heads_last).
    fn heads_first(&self, x: &Tensor) -> Result<Tensor> {
        let (b, kv_heads, gt, d) = self.q.dims4()?;
        let t = gt / self.groups;
        x.reshape((b, t, kv_heads * self.groups, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, kv_heads, gt, d))
    }

    /// f32 on the CPU: the softmax passes run as row kernels, the mask added inside them and
    /// the scale folded into `q` (a `d`-wide pass instead of an `s`-wide one).
    fn row_kernels(&self) -> bool {
        self.acc == DType::F32 && softmax::applies(&self.q)
    }

    /// `(q·scale)·kᵀ` without the mask, for the row kernels.
    fn scaled_scores(&self) -> Result<Tensor> {
        (&self.q * self.scale)?.matmul(&self.k.t()?)
    }

    fn row_mask(&self) -> Result<Option<softmax::RowMask>> {
        self.mask.as_ref().map(softmax::RowMask::new).transpose()
    }

    /// The probabilities and one log-sum-exp per query row.
    fn probs_and_lse(&self) -> Result<(Tensor, Tensor)> {
        if self.row_kernels() {
            let mask = self.row_mask()?;
            return softmax::softmax_with_lse(&self.scaled_scores()?, mask.as_ref());
        }
        let scores = self.scores()?;
        let max = scores.max_keepdim(D::Minus1)?;
        let exp = scores.broadcast_sub(&max)?.exp()?;
        drop(scores);
        let sum = exp.sum_keepdim(D::Minus1)?;
        let probs = exp.broadcast_div(&sum)?;
        Ok((probs, (max + sum.log()?)?))
    }

    /// The probabilities again, from the forward's log-sum-exp.
    fn probs_from_lse(&self, lse: &Tensor) -> Result<Tensor> {
        if self.row_kernels() {
            let mask = self.row_mask()?;
            return softmax::exp_minus(&self.scaled_scores()?, mask.as_ref(), lse);
        }
        self.scores()?.broadcast_sub(lse)?.exp()
    }

    /// `scale · q·kᵀ + mask`, `[b, kv_heads, groups · t, s]` in the accumulation dtype.
    fn scores(&self) -> Result<Tensor> {
        let (b, kv_heads, gt, _) = self.q.dims4()?;
        let scores = (self.q.matmul(&self.k.t()?)? * self.scale)?.to_dtype(self.acc)?;
        match &self.mask {
            None => Ok(scores),
            Some(m) => scores
                .reshape((b, kv_heads, self.groups, gt / self.groups, self.s))?
                .broadcast_add(&m.to_dtype(self.acc)?.unsqueeze(1)?)?
                .reshape((b, kv_heads, gt, self.s)),
        }
    }

    fn backward(
        &self,
        out: &Tensor,
        lse: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let acc = self.acc;
        let probs = self.probs_from_lse(lse)?;
        let d_out = self.heads_first(&d_out.to_dtype(acc)?)?;
        let out = self.heads_first(out)?;
        let dv = probs.t()?.matmul(&d_out)?;
        let d_probs = d_out.matmul(&self.v.to_dtype(acc)?.t()?)?;
        let delta = (&d_out * out.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?;
        // The softmax backward with the scale of the scores folded in.
        let d_scores = if self.row_kernels() {
            softmax::softmax_grad(&probs, &d_probs, &delta, self.scale)?
        } else {
            ((probs * d_probs.broadcast_sub(&delta)?)? * self.scale)?
        };
        let dq = d_scores.matmul(&self.k.to_dtype(acc)?)?;
        let dk = d_scores.t()?.matmul(&self.q.to_dtype(acc)?)?;
        Ok((
            dq.to_dtype(self.q.dtype())?,
            dk.to_dtype(self.k.dtype())?,
            dv.to_dtype(self.v.dtype())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The decoder's former composition: matmul, scale, mask, candle's softmax, matmul.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        groups: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, kvh, gt, _) = q.dims4()?;
        let s = k.dim(2)?;
        let scores = (q.matmul(&k.t()?)? * scale)?
            .reshape((b, kvh, groups, gt / groups, s))?
            .broadcast_add(&mask.unsqueeze(1)?)?
            .reshape((b, kvh, gt, s))?;
        let out = candle_nn_softmax(&scores)?.matmul(v)?;
        let (t, d) = (gt / groups, out.dim(3)?);
        out.reshape((b, kvh * groups, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, kvh * groups * d))
    }

    fn candle_nn_softmax(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    #[test]
    fn forward_and_gradients_match_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (b, kvh, groups, t, s, d) = (2, 2, 3, 5, 7, 4);
        for dtype in [DType::F32, DType::F64] {
            let q = Var::randn(0f32, 1., (b, kvh, groups * t, d), &dev)?;
            let k = Var::randn(0f32, 1., (b, kvh, s, d), &dev)?;
            let v = Var::randn(0f32, 1., (b, kvh, s, d), &dev)?;
            let (q, k, v) = (
                Var::from_tensor(&q.to_dtype(dtype)?)?,
                Var::from_tensor(&k.to_dtype(dtype)?)?,
                Var::from_tensor(&v.to_dtype(dtype)?)?,
            );
            // Causal over the last t keys, plus one padded key in the first row of the batch.
            let mut m = vec![0f32; b * t * s];
            for bi in 0..b {
                for i in 0..t {
                    for j in 0..s {
                        if j > i + (s - t) || (bi == 0 && j == 1) {
                            m[(bi * t + i) * s + j] = f32::MIN;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, t, s), &dev)?.to_dtype(dtype)?;
            let scale = 0.5;
            let c = Tensor::randn(0f32, 1., (b, t, kvh * groups * d), &dev)?.to_dtype(dtype)?;
            let run = |f: &dyn Fn() -> Result<Tensor>| -> Result<Vec<Tensor>> {
                let y = f()?;
                let g = (&y * &c)?.sum_all()?.backward()?;
                Ok(vec![
                    y,
                    g.get(q.as_tensor()).expect("dq").clone(),
                    g.get(k.as_tensor()).expect("dk").clone(),
                    g.get(v.as_tensor()).expect("dv").clone(),
                ])
            };
            let got = run(&|| attention(&q, &k, &v, Some(&mask), groups, scale))?;
            let want = run(&|| reference(&q, &k, &v, &mask, groups, scale))?;
            for (name, (g, w)) in ["out", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let err = (g - w)?
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert!(err < tol, "{dtype:?} {name}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn without_a_graph_no_copy_is_attached() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 1, 4, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, 1, 4, 8), &dev)?;
        let y = attention(&q, &k, &k, None, 2, 0.3)?;
        assert!(!y.track_op());
        assert!(
            attention(&q, &k, &k, None, 3, 0.3).is_err(),
            "4 rows in 3 groups"
        );
        Ok(())
    }
}
