//! Row passes over f32 that vectorise: the max, `Σ e^{x−m}`, `x ← e^{x−m}` and
//! `e^{x+mask−m}` of softmax-like kernels (attention, the chunked cross-entropy over the
//! vocabulary). The one place that chooses AVX-512 / AVX2 code for them.
//!
//! A float reduction written as one running value does not vectorise (without fast-math the
//! compiler may not reassociate the additions), so these keep sixteen independent partial
//! results and combine them at the end. The exponential is [`exp_f32`]'s polynomial. Each pass
//! runs AVX-512 or AVX2 code where the CPU has it (checked once), portable code elsewhere; all
//! three give the same values up to the order of the additions.

use std::sync::OnceLock;

use crate::fast_exp::exp_f32;

const LANES: usize = 16;

/// The instruction set [`multiversion!`] functions run with on this CPU.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// AVX-512 where the CPU has it, else AVX2 + FMA, else portable code (checked once).
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    })
}

/// Defines `fn $name` with its body compiled three ways (AVX-512, AVX2 + FMA, portable) and
/// dispatching on [`isa`]. Each copy holds the body itself, not a call to a shared one, so the
/// closures in it (rayon's included) are compiled with that copy's target features too:
/// without them a `mul_add` is a libm call and the loops do not vectorise.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? $body
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            match $crate::rows::isa() {
                // SAFETY: `isa()` chose these only where the CPU has the features.
                #[cfg(target_arch = "x86_64")]
                $crate::rows::Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::rows::Isa::Avx2 => unsafe { avx2($($arg),*) },
                $crate::rows::Isa::Generic => portable($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// The largest value (NaNs ignored; `−∞` for an empty row).
    pub(crate) fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = xs.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for j in 0..LANES {
                acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
            }
        }
        rest.iter()
            .chain(&acc)
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
    }
}

multiversion! {
    /// `Σ e^{x − m}`.
    pub(crate) fn sum_exp_minus(xs: &[f32], m: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = xs.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for j in 0..LANES {
                acc[j] += exp_f32(c[j] - m);
            }
        }
        acc.iter().sum::<f32>() + rest.iter().map(|&v| exp_f32(v - m)).sum::<f32>()
    }
}

multiversion! {
    /// `x ← e^{x − m}`, returning `Σ e^{x − m}`.
    pub(crate) fn exp_minus_in_place(xs: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                c[j] = exp_f32(c[j] - m);
                acc[j] += c[j];
            }
        }
        let mut rest = 0f32;
        for v in chunks.into_remainder() {
            *v = exp_f32(*v - m);
            rest += *v;
        }
        acc.iter().sum::<f32>() + rest
    }
}

multiversion! {
    /// `out ← e^{x + add − shift}` (`add`: an additive mask row, or none).
    pub(crate) fn exp_into(out: &mut [f32], x: &[f32], add: Option<&[f32]>, shift: f32) {
        match add {
            Some(add) => {
                for ((o, &v), &a) in out.iter_mut().zip(x).zip(add) {
                    *o = exp_f32(v + a - shift);
                }
            }
            None => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = exp_f32(v - shift);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_agree_with_plain_loops() {
        // Lengths around the 16-wide chunks, values wide enough to matter.
        for len in [0usize, 1, 15, 16, 17, 49, 300] {
            let xs: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
                .collect();
            let want_max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), want_max, "len {len}");
            let m = if len == 0 { 0.0 } else { want_max };
            let want: f64 = xs.iter().map(|&v| ((v - m) as f64).exp()).sum();
            let got = sum_exp_minus(&xs, m) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1.0),
                "len {len}: {got} vs {want}"
            );
            let mut ys = xs.clone();
            let s = exp_minus_in_place(&mut ys, m) as f64;
            assert!((s - want).abs() <= 1e-6 * want.max(1.0), "len {len}");
            for (y, &x) in ys.iter().zip(&xs) {
                let e = ((x - m) as f64).exp();
                assert!(
                    (*y as f64 - e).abs() <= 1e-6 * e.max(1e-30),
                    "len {len}: {y} vs {e}"
                );
            }
        }
        assert_eq!(max(&[1.0, f32::NAN, 3.0]), 3.0, "NaNs are ignored");
        let (x, add) = ([0.5f32, -1.0, 2.0, -90.0], [0.0f32, 1.0, f32::MIN, 0.0]);
        let mut out = [9f32; 4];
        exp_into(&mut out, &x, Some(&add), 0.25);
        let want = [0.25f64.exp(), (-0.25f64).exp(), 0.0, 0.0];
        for (o, w) in out.iter().zip(want) {
            assert!((*o as f64 - w).abs() <= 1e-6 * w.max(1e-30), "{o} vs {w}");
        }
        exp_into(&mut out, &x, None, 0.0);
        assert!((out[2] as f64 - 2f64.exp()).abs() < 1e-5);
    }
}
