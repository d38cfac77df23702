//! Row-wise softmax with its log-sum-exp, and `exp(x − lse)`, for attention's scores on the
//! CPU in f32: one pass per row with the vectorised [`exp_f32`] instead of candle's chain of
//! max, subtract, exp, sum and divide (five passes and four temporaries, with glibc's scalar
//! `expf`, slow for the masked scores). Other devices and dtypes keep that chain, in
//! `attention` (see [`applies`]).

use candle_core::{DType, Result, Tensor, D};

use crate::common::with_cpu_f32;
use rayon::prelude::*;

/// Rows per rayon task (a row of attention scores is one key length).
const ROWS_PER_TASK: usize = 64;

/// An additive mask shared by every head, `[batches, 1, t, s]`, for score rows laid out
/// `[b, .., t]`-major: score row `r` of batch element `r / rows_per_batch` reads mask row
/// `(that element, or 0 when batches = 1)·t + r mod t`.
pub struct RowMask {
    values: Vec<f32>,
    batches: usize,
    t: usize,
}

impl RowMask {
    /// From a `[batches, 1, t, s]` mask tensor (any dtype; read as f32).
    pub fn new(mask: &Tensor) -> Result<Self> {
        let (batches, _, t, _) = mask.dims4()?;
        Ok(RowMask {
            values: mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            batches,
            t,
        })
    }

    fn row(&self, r: usize, rows_per_batch: usize, s: usize) -> &[f32] {
        let b = if self.batches == 1 {
            0
        } else {
            r / rows_per_batch
        };
        let at = (b * self.t + r % self.t) * s;
        &self.values[at..at + s]
    }
}

/// Whether the row kernels serve `x` (an f32 tensor on the CPU); otherwise use candle's ops.
pub fn applies(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}

/// `(softmax(x + mask), ln Σ exp(x + mask))` along the last dimension of an f32 CPU tensor
/// `x: [b, .., s]`; the second keeps that dimension with size 1. Errors if not [`applies`].
pub fn softmax_with_lse(x: &Tensor, mask: Option<&RowMask>) -> Result<(Tensor, Tensor)> {
    let s = x.dim(D::Minus1)?;
    let rows_per_batch = x.elem_count() / s.max(1) / x.dim(0)?.max(1);
    let mut lse_dims = x.dims().to_vec();
    *lse_dims.last_mut().expect("rank >= 1") = 1;
    let (probs, lse) = with_cpu_f32(x, |xs| {
        let rows = xs.len() / s.max(1);
        let mut probs = vec![0f32; xs.len()];
        let mut lse = vec![0f32; rows];
        probs
            .par_chunks_mut(s * ROWS_PER_TASK)
            .zip(lse.par_chunks_mut(ROWS_PER_TASK))
            .zip(xs.par_chunks(s * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, ((p, l), x))| {
                let row_mask =
                    |i: usize| mask.map(|m| m.row(task * ROWS_PER_TASK + i, rows_per_batch, s));
                rows_softmax(x, p, l, s, &row_mask)
            });
        (probs, lse)
    })?;
    Ok((
        Tensor::from_vec(probs, x.dims(), x.device())?,
        Tensor::from_vec(lse, lse_dims, x.device())?,
    ))
}

/// `exp(x + mask − lse)` with `lse` of `x`'s shape but 1 in the last dimension (the
/// probabilities again, from the forward's log-sum-exp). f32 on the CPU only.
pub fn exp_minus(x: &Tensor, mask: Option<&RowMask>, lse: &Tensor) -> Result<Tensor> {
    let s = x.dim(D::Minus1)?;
    let rows_per_batch = x.elem_count() / s.max(1) / x.dim(0)?.max(1);
    let ls = with_cpu_f32(lse, <[f32]>::to_vec)?;
    if ls.len() * s != x.elem_count() {
        candle_core::bail!("exp_minus: lse {:?} for x {:?}", lse.dims(), x.dims())
    }
    let out = with_cpu_f32(x, |xs| {
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(s * ROWS_PER_TASK)
            .zip(xs.par_chunks(s * ROWS_PER_TASK))
            .zip(ls.par_chunks(ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, ((o, x), l))| {
                let row_mask =
                    |i: usize| mask.map(|m| m.row(task * ROWS_PER_TASK + i, rows_per_batch, s));
                rows_exp_minus(x, l, o, s, &row_mask)
            });
        out
    })?;
    Tensor::from_vec(out, x.dims(), x.device())
}

/// The softmax backward `scale · p ⊙ (dp − delta)` (delta: one value per row, the last
/// dimension 1), in one pass. f32 on the CPU only.
pub fn softmax_grad(p: &Tensor, dp: &Tensor, delta: &Tensor, scale: f64) -> Result<Tensor> {
    let s = p.dim(D::Minus1)?;
    let ds = with_cpu_f32(delta, <[f32]>::to_vec)?;
    if ds.len() * s != p.elem_count() || dp.elem_count() != p.elem_count() {
        candle_core::bail!(
            "softmax_grad: p {:?}, dp {:?}, delta {:?}",
            p.dims(),
            dp.dims(),
            delta.dims()
        )
    }
    let c = scale as f32;
    // Both large operands read in place (no copy out of their storages).
    let out = with_cpu_f32(dp, |dps| {
        with_cpu_f32(p, |ps| {
            let mut out = vec![0f32; ps.len()];
            out.par_chunks_mut(s * ROWS_PER_TASK)
                .zip(ps.par_chunks(s * ROWS_PER_TASK))
                .zip(dps.par_chunks(s * ROWS_PER_TASK))
                .zip(ds.par_chunks(ROWS_PER_TASK))
                .for_each(|(((o, p), dp), d)| {
                    for (((orow, prow), dprow), &dv) in o
                        .chunks_exact_mut(s)
                        .zip(p.chunks_exact(s))
                        .zip(dp.chunks_exact(s))
                        .zip(d)
                    {
                        for ((ov, &pv), &dpv) in orow.iter_mut().zip(prow).zip(dprow) {
                            *ov = c * pv * (dpv - dv);
                        }
                    }
                });
            out
        })
    })??;
    Tensor::from_vec(out, p.dims(), p.device())
}

type MaskRow<'a> = dyn Fn(usize) -> Option<&'a [f32]> + 'a;

/// Softmax and log-sum-exp of each row of `x` (the mask added first) into `p` and `l`. The
/// max and exp passes are [`crate::rows`]' vectorised ones; the mask add and the scale are
/// plain maps.
fn rows_softmax(x: &[f32], p: &mut [f32], l: &mut [f32], s: usize, mask: &MaskRow) {
    for (i, ((xr, pr), lr)) in x
        .chunks_exact(s)
        .zip(p.chunks_exact_mut(s))
        .zip(l.iter_mut())
        .enumerate()
    {
        match mask(i) {
            Some(m) => {
                for ((pv, &xv), &mv) in pr.iter_mut().zip(xr).zip(m) {
                    *pv = xv + mv;
                }
            }
            None => pr.copy_from_slice(xr),
        }
        let m = crate::rows::max(pr);
        let sum = crate::rows::exp_minus_in_place(pr, m);
        let inv = 1.0 / sum;
        for pv in pr.iter_mut() {
            *pv *= inv;
        }
        *lr = m + sum.ln();
    }
}

/// `exp(x + mask − l)` of each row into `o`.
fn rows_exp_minus(x: &[f32], l: &[f32], o: &mut [f32], s: usize, mask: &MaskRow) {
    for (i, ((xr, orow), &lv)) in x
        .chunks_exact(s)
        .zip(o.chunks_exact_mut(s))
        .zip(l)
        .enumerate()
    {
        crate::rows::exp_into(orow, xr, mask(i), lv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;
    use candle_core::Device;

    #[test]
    fn matches_candles_chain_with_a_mask() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, s) = (2, 3, 5, 7);
        let x = Tensor::randn(0f32, 3., (b, h, t, s), &dev)?;
        // Causal over the last t keys, plus a padded key in batch element 1.
        let mut m = vec![0f32; b * t * s];
        for bi in 0..b {
            for ti in 0..t {
                for si in 0..s {
                    if si > ti + (s - t) || (bi == 1 && si == 0) {
                        m[(bi * t + ti) * s + si] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, s), &dev)?;
        let masked = x.broadcast_add(&mask)?;
        let max = masked.max_keepdim(D::Minus1)?;
        let e = masked.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let (want_p, want_lse) = (e.broadcast_div(&sum)?, (max + sum.log()?)?);
        for m in [Some(RowMask::new(&mask)?), None] {
            let (p, lse) = softmax_with_lse(&x, m.as_ref())?;
            if m.is_some() {
                assert_close("probs", &p, &want_p, 1e-6)?;
                assert_close("lse", &lse, &want_lse, 1e-6)?;
            }
            assert_close("exp(x - lse)", &exp_minus(&x, m.as_ref(), &lse)?, &p, 1e-6)?;
        }
        // A batch-1 mask serves every batch element.
        let one = mask.narrow(0, 0, 1)?;
        let (p1, _) = softmax_with_lse(&x, Some(&RowMask::new(&one)?))?;
        let want = {
            let masked = x.broadcast_add(&one)?;
            let max = masked.max_keepdim(D::Minus1)?;
            let e = masked.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        };
        assert_close("probs, batch-1 mask", &p1, &want, 1e-6)?;
        Ok(())
    }

    #[test]
    fn the_gradient_pass_is_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::rand(0f32, 1., (2, 3, 4, 9), &dev)?;
        let dp = Tensor::randn(0f32, 1., (2, 3, 4, 9), &dev)?;
        let delta = Tensor::randn(0f32, 1., (2, 3, 4, 1), &dev)?;
        let want = ((&p * dp.broadcast_sub(&delta)?)? * 0.125)?;
        assert_close("ds", &softmax_grad(&p, &dp, &delta, 0.125)?, &want, 1e-6)?;
        Ok(())
    }
}
