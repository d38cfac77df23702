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

use crate::attention_cpu::{self, Dims, RowMask, Visible};
use crate::common::with_cpu_f32s;

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
    if q.dtype() == DType::F32 && q.device().is_cpu() {
        return attention_on_cpu(q, k, v, mask, groups, scale);
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

/// The f32 CPU path: blocked, over the keys the mask leaves visible (`attention_cpu`). The
/// inputs are read in place (and kept for the backward as the graph keeps them: no copies).
fn attention_on_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    groups: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, kv, gt, d) = q.dims4()?;
    let dims = Dims {
        b,
        kv,
        groups,
        t: gt / groups,
        s: k.dim(2)?,
        d,
    };
    let (qd, kd, vd) = (
        q.detach().contiguous()?,
        k.detach().contiguous()?,
        v.detach().contiguous()?,
    );
    // The mask's rows and visible key ranges, read once for the forward and the backward.
    let visible = Visible::new(mask.map(RowMask::new).transpose()?, &dims);
    let scale = scale as f32;
    let (out, lse) = with_cpu_f32s([&qd, &kd, &vd], |[qs, ks, vs]| {
        attention_cpu::forward(qs, ks, vs, &visible, &dims, scale)
    })?;
    let out = Tensor::from_vec(out, (b, dims.t, kv * groups * d), q.device())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    crate::frozen::reattach3((q, k, v), out, move |d_out, out| {
        let (dq, dk, dv) = with_cpu_f32s([&qd, &kd, &vd, out, d_out], |[qs, ks, vs, os, dos]| {
            attention_cpu::backward((qs, ks, vs), os, &lse, dos, &visible, &dims, scale)
        })?;
        Ok((
            Tensor::from_vec(dq, qd.shape(), qd.device())?,
            Tensor::from_vec(dk, kd.shape(), kd.device())?,
            Tensor::from_vec(dv, vd.shape(), vd.device())?,
        ))
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

    /// The probabilities and one log-sum-exp per query row.
    fn probs_and_lse(&self) -> Result<(Tensor, Tensor)> {
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
        let d_scores = ((probs * d_probs.broadcast_sub(&delta)?)? * self.scale)?;
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

    /// The blocked CPU path over several query blocks, against the composition, for each kind
    /// of mask the decoder builds: causal after a key prefix, a sliding window, left padding
    /// (rows that see no key at all), packed sequences, per-batch masks, and none.
    #[test]
    fn the_blocked_path_matches_the_composition_for_every_mask() -> Result<()> {
        let dev = Device::Cpu;
        let (b, kvh, groups, t, d, prefix) = (2, 2, 2, 150, 16, 5);
        let s = t + prefix;
        type Sees<'a> = &'a dyn Fn(usize, usize, usize) -> bool;
        let visible: [(&str, Sees); 4] = [
            ("causal after a prefix", &|_, i, j| j <= i + prefix),
            ("sliding window of 40", &|_, i, j| {
                j <= i + prefix && j + 40 > i + prefix
            }),
            ("left padding in batch 1", &|bi, i, j| {
                j <= i + prefix && !(bi == 1 && (i < 10 || j < 10 + prefix))
            }),
            ("two packed sequences", &|_, i, j| {
                let seg = |x: usize| usize::from(x >= 70);
                j >= prefix && j <= i + prefix && seg(i) == seg(j - prefix)
            }),
        ];
        let q = Var::randn(0f32, 1., (b, kvh, groups * t, d), &dev)?;
        let k = Var::randn(0f32, 1., (b, kvh, s, d), &dev)?;
        let v = Var::randn(0f32, 1., (b, kvh, s, d), &dev)?;
        let c = Tensor::randn(0f32, 1., (b, t, kvh * groups * d), &dev)?;
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
        let mut masks: Vec<(String, Option<Tensor>)> = vec![("no mask".into(), None)];
        for (name, see) in visible {
            let m: Vec<f32> = (0..b * t * s)
                .map(|x| {
                    let (bi, i, j) = (x / (t * s), x / s % t, x % s);
                    if see(bi, i, j) {
                        0.0
                    } else {
                        f32::MIN
                    }
                })
                .collect();
            masks.push((name.into(), Some(Tensor::from_vec(m, (b, 1, t, s), &dev)?)));
        }
        // One mask shared by the batch (the causal one, without its padding).
        let shared: Vec<f32> = (0..t * s)
            .map(|x| {
                if x % s <= x / s + prefix {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect();
        masks.push((
            "shared causal".into(),
            Some(Tensor::from_vec(shared, (1, 1, t, s), &dev)?),
        ));
        for (name, mask) in &masks {
            let got = run(&|| attention(&q, &k, &v, mask.as_ref(), groups, 0.25))?;
            let zero = Tensor::zeros((1, 1, t, s), DType::F32, &dev)?;
            let want =
                run(&|| reference(&q, &k, &v, mask.as_ref().unwrap_or(&zero), groups, 0.25))?;
            for (what, (g, w)) in ["out", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let err = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err <= 1e-5 * scale.max(1.0),
                    "{name}, {what}: {err} (scale {scale})"
                );
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
