//! `eˣ` for f32 without a libm call, so the loops that use it vectorise.
//!
//! glibc's `expf` is a scalar call (and takes a slow path for arguments that underflow, such
//! as the masked scores of causal attention); with it, the exponentials of attention, SwiGLU and
//! the chunked cross-entropy were about a tenth of a SmolLM2 training step. Here:
//! `eˣ = 2ⁿ · eʳ` with `n = round(x / ln 2)`, `r = x − n·ln 2` in `[−0.347, 0.347]` (Cody–Waite,
//! `ln 2` in two parts), `eʳ` by its Taylor polynomial to degree 7 (truncation below 5e-9
//! relative), and `2ⁿ` built in the exponent bits as two halves so it never leaves the normal
//! range. Below −87.33 (where `eˣ` is subnormal) the result is exactly 0; above 88.72 it is
//! `+∞`; NaN stays NaN.

/// `eˣ`, within 2 ulp for normal results (see the module notes for the edges).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with few enough bits that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.33;
    const HI: f32 = 88.72;
    // `clamp` passes NaN through (unlike `max`/`min`) and compiles to selects.
    let xc = x.clamp(LO, HI);
    // Round to nearest by the 1.5·2²³ trick (|x·log2 e| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `n` as an integer, read from the low bits of `shifted` (whose unit in the last place is
    // 1): `n as i32` would be Rust's saturating cast, which does not vectorise (a scalar
    // convert and NaN check per lane, a third of the loops' time).
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let (n1, n2) = (ni >> 1, ni - (ni >> 1));
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_exp_across_the_range() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        // f32's own rounding is 6e-8; allow two ulps.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::MIN), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        let want = (88.7f32 as f64).exp();
        assert!((exp_f32(88.7) as f64 - want).abs() / want < 2.4e-7);
    }
}
