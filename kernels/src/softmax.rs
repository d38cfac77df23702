//! Row-wise softmax with its log-sum-exp, and `exp(x − lse)`, for attention's scores on the
//! CPU in f32: one pass per row with the vectorised [`exp_f32`] instead of candle's chain of
//! max, subtract, exp, sum and divide (five passes and four temporaries, with glibc's scalar
//! `expf`, slow for the masked scores). Other devices and dtypes use that chain.

use candle_core::{DType, Result, Storage, Tensor, D};
use rayon::prelude::*;

use crate::fast_exp::exp_f32;

/// Rows per rayon task (a row of attention scores is one key length).
const ROWS_PER_TASK: usize = 64;

/// `(softmax(x), max + ln Σ exp(x − max))` along the last dimension; the second keeps that
/// dimension with size 1.
pub fn softmax_with_lse(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = x.dim(D::Minus1)?;
    let mut lse_dims = x.dims().to_vec();
    *lse_dims.last_mut().expect("rank >= 1") = 1;
    let fast = with_cpu_f32(x, |xs| {
        let rows = xs.len() / s.max(1);
        let mut probs = vec![0f32; xs.len()];
        let mut lse = vec![0f32; rows];
        probs
            .par_chunks_mut(s * ROWS_PER_TASK)
            .zip(lse.par_chunks_mut(ROWS_PER_TASK))
            .zip(xs.par_chunks(s * ROWS_PER_TASK))
            .for_each(|((p, l), x)| rows_softmax(x, p, l, s));
        (probs, lse)
    })?;
    if let Some((probs, lse)) = fast {
        return Ok((
            Tensor::from_vec(probs, x.dims(), x.device())?,
            Tensor::from_vec(lse, lse_dims, x.device())?,
        ));
    }
    let max = x.max_keepdim(D::Minus1)?;
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let probs = exp.broadcast_div(&sum)?;
    Ok((probs, (max + sum.log()?)?))
}

/// `exp(x − lse)` with `lse` of `x`'s shape but 1 in the last dimension.
pub fn exp_minus(x: &Tensor, lse: &Tensor) -> Result<Tensor> {
    let s = x.dim(D::Minus1)?;
    let lse_values = with_cpu_f32(lse, <[f32]>::to_vec)?;
    let fast = match lse_values {
        Some(ls) if ls.len() * s == x.elem_count() => with_cpu_f32(x, |xs| {
            let mut out = vec![0f32; xs.len()];
            out.par_chunks_mut(s * ROWS_PER_TASK)
                .zip(xs.par_chunks(s * ROWS_PER_TASK))
                .zip(ls.par_chunks(ROWS_PER_TASK))
                .for_each(|((o, x), l)| rows_exp_minus(x, l, o, s));
            out
        })?,
        _ => None,
    };
    match fast {
        Some(out) => Tensor::from_vec(out, x.dims(), x.device()),
        None => x.broadcast_sub(lse)?.exp(),
    }
}

/// Runs `f` on the elements of `t` when it is an f32 CPU tensor (made contiguous first).
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return Ok(None);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => Ok(Some(f(&v[a..b]))),
        _ => Ok(None),
    }
}

fn rows_softmax(x: &[f32], p: &mut [f32], l: &mut [f32], s: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { rows_softmax_avx2(x, p, l, s) };
    }
    rows_softmax_body(x, p, l, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_softmax_avx2(x: &[f32], p: &mut [f32], l: &mut [f32], s: usize) {
    rows_softmax_body(x, p, l, s)
}

#[inline(always)]
fn rows_softmax_body(x: &[f32], p: &mut [f32], l: &mut [f32], s: usize) {
    for ((xr, pr), lr) in x
        .chunks_exact(s)
        .zip(p.chunks_exact_mut(s))
        .zip(l.iter_mut())
    {
        let m = xr
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        let mut sum = 0f32;
        for (pv, &xv) in pr.iter_mut().zip(xr) {
            let e = exp_f32(xv - m);
            *pv = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        for pv in pr.iter_mut() {
            *pv *= inv;
        }
        *lr = m + sum.ln();
    }
}

fn rows_exp_minus(x: &[f32], l: &[f32], o: &mut [f32], s: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        return unsafe { rows_exp_minus_avx2(x, l, o, s) };
    }
    rows_exp_minus_body(x, l, o, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_exp_minus_avx2(x: &[f32], l: &[f32], o: &mut [f32], s: usize) {
    rows_exp_minus_body(x, l, o, s)
}

#[inline(always)]
fn rows_exp_minus_body(x: &[f32], l: &[f32], o: &mut [f32], s: usize) {
    for ((xr, orow), &lv) in x.chunks_exact(s).zip(o.chunks_exact_mut(s)).zip(l) {
        for (ov, &xv) in orow.iter_mut().zip(xr) {
            *ov = exp_f32(xv - lv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;
    use candle_core::Device;

    #[test]
    fn matches_candles_chain_with_masked_entries() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3., (3, 70, 37), &dev)?).contiguous()?;
        // Mask a causal-like block with f32::MIN, as attention does.
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        for (i, e) in v.iter_mut().enumerate() {
            if (i % 37) > (i / 37) % 37 {
                *e += f32::MIN;
            }
        }
        let x = Tensor::from_vec(v, (3, 70, 37), &dev)?;
        let (p, lse) = softmax_with_lse(&x)?;
        let max = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        assert_close("probs", &p, &e.broadcast_div(&sum)?, 1e-6)?;
        assert_close("lse", &lse, &(max + sum.log()?)?, 1e-6)?;
        let back = exp_minus(&x, &lse)?;
        assert_close("exp(x - lse)", &back, &p, 1e-6)?;
        Ok(())
    }
}
