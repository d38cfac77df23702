//! Test helpers: compare a fused op with its candle composition.

use candle_core::{DType, Result, Tensor, Var};

/// `y = f(x)` and `d(sum(y ⊙ c))/dx`: a random linear functional probes every output.
pub(crate) fn grad_of(
    x: &Var,
    c: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let y = f(x.as_tensor())?;
    let grads = (&y * c)?.sum_all()?.backward()?;
    let dx = grads
        .get(x.as_tensor())
        .expect("gradient reaches x")
        .clone();
    Ok((y, dx))
}

/// `max |a − b| / max |b| ≤ tol` (relative to the reference's scale), computed in f64.
pub(crate) fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
    assert!(
        diff / scale <= tol,
        "{what}: max diff {diff:e} / scale {scale:e} > {tol:e}"
    );
    Ok(())
}

/// `len` values uniform in [-1, 1) from a seeded linear congruential generator (reproducible
/// across runs and platforms).
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
