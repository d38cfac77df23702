//! Helpers shared by the CPU implementations: element types, contiguous views, dispatch.

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor, WithDType};

/// The float types the CPU kernels are written for (f16/bf16 are widened to f32 by the public
/// wrappers, like candle's own CPU backend does for matmul).
pub(crate) trait Float: WithDType + std::ops::Neg<Output = Self> {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn fmax(self, other: Self) -> Self;
    /// Row passes of softmax-like kernels: plain loops here, `rows`' vectorised ones for f32.
    /// The largest value (NaNs ignored).
    fn max_row(row: &[Self]) -> Self {
        row.iter()
            .fold(Self::from_f64(f64::NEG_INFINITY), |a, &b| a.fmax(b))
    }
    /// `Σ e^{x − m}`.
    fn sum_exp_minus_row(row: &[Self], m: Self) -> Self {
        row.iter().fold(Self::zero(), |acc, &v| acc + (v - m).exp())
    }
    /// `x ← e^{x − m}`.
    fn exp_minus_row(row: &mut [Self], m: Self) {
        for v in row {
            *v = (*v - m).exp();
        }
    }
    /// The mutable buffer of a storage of this type.
    fn storage_mut(s: &mut CpuStorage) -> Result<&mut [Self]>;
}

macro_rules! float {
    ($t:ty, $variant:ident, $exp:expr $(, $row_pass:item)*) => {
        impl Float for $t {
            $($row_pass)*
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn fmax(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn storage_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Ok(v),
                    other => bail!(
                        "expected {} storage, got {:?}",
                        stringify!($t),
                        candle_core::backend::BackendStorage::dtype(other)
                    ),
                }
            }
        }
    };
}
// f32 without a libm call, so the kernels' loops vectorise (see `fast_exp`), and the row
// passes of `rows`.
float!(
    f32,
    F32,
    crate::fast_exp::exp_f32,
    fn max_row(row: &[f32]) -> f32 {
        crate::rows::max(row)
    },
    fn sum_exp_minus_row(row: &[f32], m: f32) -> f32 {
        crate::rows::sum_exp_minus(row, m)
    },
    fn exp_minus_row(row: &mut [f32], m: f32) {
        crate::rows::exp_minus_in_place(row, m);
    }
);
float!(f64, F64, f64::exp);

/// The contiguous elements of `s` under `l`; the wrappers make inputs contiguous first.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!(
            "{op}: expected a contiguous input, got strides {:?}",
            l.stride()
        )
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// Calls `$f::<f32>` or `$f::<f64>` according to the storage's dtype.
macro_rules! dispatch_float {
    ($op:expr, $dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {{
        #[allow(unused_imports)]
        use candle_core::backend::BackendStorage as _;
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            other => candle_core::bail!("{}: CPU kernel supports f32 and f64, got {other:?}", $op),
        }
    }};
}
pub(crate) use dispatch_float;

/// The dtype a CPU kernel computes in for activations of `dtype` (f16/bf16 → f32).
pub(crate) fn cpu_dtype(device: &Device, dtype: DType) -> DType {
    match (device, dtype) {
        (Device::Cpu, DType::F16 | DType::BF16) => DType::F32,
        _ => dtype,
    }
}

/// A tensor with no graph from a CPU buffer (used for values saved by a forward).
pub(crate) fn cpu_tensor<T: WithDType>(data: Vec<T>, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cpu(T::to_cpu_storage_owned(data)),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// Rows handed to one rayon task: enough work to amortise the scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// Runs `f` on the elements of `t`, an f32 CPU tensor (made contiguous first; read in place,
/// no copy out of the storage when it already is).
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_cpu_f32s([t], |[x]| f(x))
}

/// [`with_cpu_f32`] for several tensors at once.
pub(crate) fn with_cpu_f32s<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let ts = ts.map(Tensor::contiguous);
    let ts: Vec<Tensor> = ts.into_iter().collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = Vec::with_capacity(N);
    for (t, (storage, layout)) in ts.iter().zip(&guards) {
        match (&**storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => slices.push(&v[a..b]),
            _ => bail!(
                "expected an f32 tensor on the CPU, got {:?} on {:?}",
                t.dtype(),
                t.device().location()
            ),
        }
    }
    let slices: [&[f32]; N] = slices.try_into().expect("one slice per tensor");
    Ok(f(slices))
}
