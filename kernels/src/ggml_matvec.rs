//! `y = x · Wᵀ` for a few rows of f32 `x` (decoding) against a weight stored in GGML's
//! Q4_0, Q4_1 or Q8_0 blocks, read straight from the packed bytes, or dense in f32.
//!
//! Decoding is bound by reading the weights, so the kernel streams each weight row once per
//! call, dequantizes 32 values at a time in registers and multiplies them with the f32
//! activations (no rounding of the activations to 8 bits, unlike GGML's own dot products).
//! The loops are written so that LLVM vectorises them; they are compiled a second time with
//! AVX2+FMA (chosen at run time), and rows are split over the rayon threads.

use half::f16;
use rayon::prelude::*;

/// The block formats this kernel reads (32 elements per block, as GGML lays them out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// `{ d: f16, qs: [u8; 16] }`: `d · (q − 8)`, low nibbles first.
    Q4_0,
    /// `{ d: f16, m: f16, qs: [u8; 16] }`: `d · q + m`, low nibbles first.
    Q4_1,
    /// `{ d: f16, qs: [i8; 32] }`: `d · q`.
    Q8_0,
}

impl BlockFormat {
    pub const BLOCK: usize = 32;

    /// Bytes per block of 32 elements.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }
}

/// `y[r][o] = Σ_k x[r][k] · W[o][k]` for `x: [m, k]` row-major and `W: [n, k]` as `n` rows of
/// `k / 32` blocks. Returns `y: [m, n]` row-major. `k` must be a multiple of 32 and `w` exactly
/// `n · k / 32` blocks (checked).
pub fn matmul_t(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    format: BlockFormat,
) -> Result<Vec<f32>, String> {
    if !k.is_multiple_of(BlockFormat::BLOCK) {
        return Err(format!(
            "{k} columns are not a whole number of 32-element blocks"
        ));
    }
    let row_bytes = k / BlockFormat::BLOCK * format.block_bytes();
    if w.len() != n * row_bytes || x.len() != m * k {
        return Err(format!(
            "{} weight bytes and {} inputs for [{n}, {k}] {format:?} and {m} rows",
            w.len(),
            x.len()
        ));
    }
    // Per-block sums of x, for the offset terms (Q4_1's `m`, Q4_0's `−8·d`).
    let xsum: Vec<f32> = x
        .chunks_exact(BlockFormat::BLOCK)
        .map(|c| c.iter().sum())
        .collect();
    let blocks_per_row = k / BlockFormat::BLOCK;
    Ok(rows_times(m, n, |o, r| {
        dot(
            format,
            &w[o * row_bytes..(o + 1) * row_bytes],
            &x[r * k..(r + 1) * k],
            &xsum[r * blocks_per_row..(r + 1) * blocks_per_row],
        )
    }))
}

/// [`matmul_t`] for a dense f32 `W: [n, k]` (row-major): one streaming pass over the weight,
/// which a general GEMM does not manage for a single row of `x`.
pub fn matmul_t_f32(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
) -> Result<Vec<f32>, String> {
    if w.len() != n * k || x.len() != m * k {
        return Err(format!(
            "{} weights and {} inputs for [{n}, {k}] and {m} rows",
            w.len(),
            x.len()
        ));
    }
    Ok(rows_times(m, n, |o, r| {
        dot_f32(&w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k])
    }))
}

/// `y[r][o] = row_dot(o, r)` for `m` input rows and `n` weight rows, `[m, n]` row-major. Each
/// task owns a range of weight rows (read once, for every input row); two tasks per thread: a
/// decoding call is short, so fewer, larger tasks than rayon's default splitting keep the
/// scheduling cost (wake-ups, yields) below the work.
fn rows_times(m: usize, n: usize, row_dot: impl Fn(usize, usize) -> f32 + Sync) -> Vec<f32> {
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    let tasks = (rayon::current_num_threads() * 2).clamp(1, n.div_ceil(16));
    let rows_per_task = n.div_ceil(tasks);
    // Written transposed ([n, m]) so each task owns one contiguous range; m is small.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let o0 = task * rows_per_task;
            for (i, slot) in chunk.chunks_mut(m).enumerate() {
                for (r, y) in slot.iter_mut().enumerate() {
                    *y = row_dot(o0 + i, r);
                }
            }
        });
    let mut out = vec![0f32; m * n];
    for o in 0..n {
        for r in 0..m {
            out[r * n + o] = out_t[o * m + r];
        }
    }
    out
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_f32_avx2(a, b) };
        }
    }
    dot_f32_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_lanes(a, b)
}

#[inline(always)]
fn dot_f32_lanes(a: &[f32], b: &[f32]) -> f32 {
    // 32 independent lanes (4 AVX2 registers) so the loads stream and the FMAs overlap.
    let mut lanes = [0f32; 32];
    let chunks = a.len() / 32 * 32;
    for (ca, cb) in a[..chunks]
        .chunks_exact(32)
        .zip(b[..chunks].chunks_exact(32))
    {
        for j in 0..32 {
            lanes[j] = ca[j].mul_add(cb[j], lanes[j]);
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

fn dot(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(format, row, x, xsum) };
        }
    }
    dot_generic(format, row, x, xsum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    // The F16C instruction inline (half's conversion re-checks the CPU on every call).
    // (Runs only where F16C is present: this function's own target features.)
    let scale = |b: &[u8], at: usize| {
        use std::arch::x86_64::{_mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32};
        let bits = u16::from_le_bytes([b[at], b[at + 1]]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    };
    dot_blocks(format, row, x, xsum, scale)
}

fn dot_generic(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let scale = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    dot_blocks(format, row, x, xsum, scale)
}

#[inline(always)]
fn dot_blocks(
    format: BlockFormat,
    row: &[u8],
    x: &[f32],
    xsum: &[f32],
    scale: impl Fn(&[u8], usize) -> f32,
) -> f32 {
    // 16 independent lanes so the block loop vectorises; one horizontal sum at the end.
    let mut lanes = [0f32; 16];
    let mut offset_term = 0f32;
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let bytes = format.block_bytes();
            let q_at = bytes - 16;
            for ((blk, xs), s) in row.chunks_exact(bytes).zip(x.chunks_exact(32)).zip(xsum) {
                let d = scale(blk, 0);
                let qs = &blk[q_at..q_at + 16];
                let (lo_x, hi_x) = xs.split_at(16);
                if format == BlockFormat::Q4_1 {
                    offset_term += scale(blk, 2) * s;
                } else {
                    offset_term -= 8.0 * d * s;
                }
                for j in 0..16 {
                    let lo = (qs[j] & 0x0F) as f32;
                    let hi = (qs[j] >> 4) as f32;
                    lanes[j] += d * (lo * lo_x[j] + hi * hi_x[j]);
                }
            }
        }
        BlockFormat::Q8_0 => {
            for (blk, xs) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
                let d = scale(blk, 0);
                let qs = &blk[2..34];
                for j in 0..16 {
                    let a = qs[j] as i8 as f32;
                    let b = qs[j + 16] as i8 as f32;
                    lanes[j] += d * (a * xs[j] + b * xs[j + 16]);
                }
            }
        }
    }
    lanes.iter().sum::<f32>() + offset_term
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state >> 33
    }

    /// Random blocks and their dequantized values, element by element from the layout.
    fn random_matrix(format: BlockFormat, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut st = seed;
        let mut bytes = vec![];
        let mut dense = vec![];
        for _ in 0..n * k / 32 {
            let d = f16::from_f32((lcg(&mut st) % 1000) as f32 / 20000.0 + 0.001);
            bytes.extend_from_slice(&d.to_le_bytes());
            let d = d.to_f32();
            match format {
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let mut mn = 0.0;
                    if format == BlockFormat::Q4_1 {
                        let m = f16::from_f32(-((lcg(&mut st) % 1000) as f32) / 10000.0);
                        bytes.extend_from_slice(&m.to_le_bytes());
                        mn = m.to_f32();
                    }
                    let qs: Vec<u8> = (0..16).map(|_| (lcg(&mut st) % 256) as u8).collect();
                    let value = |q: u8| match format {
                        BlockFormat::Q4_1 => d * q as f32 + mn,
                        _ => d * (q as f32 - 8.0),
                    };
                    let mut block = [0f32; 32];
                    for j in 0..16 {
                        block[j] = value(qs[j] & 15);
                        block[j + 16] = value(qs[j] >> 4);
                    }
                    dense.extend_from_slice(&block);
                    bytes.extend_from_slice(&qs);
                }
                BlockFormat::Q8_0 => {
                    for _ in 0..32 {
                        let q = (lcg(&mut st) % 256) as u8;
                        bytes.push(q);
                        dense.push(d * q as i8 as f32);
                    }
                }
            }
        }
        (bytes, dense)
    }

    #[test]
    fn every_format_matches_the_dequantized_product() {
        let (n, k) = (150, 96);
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (w, dense) = random_matrix(format, n, k, 7);
            for m in [1, 3] {
                let mut st = 99;
                let x: Vec<f32> = (0..m * k)
                    .map(|_| (lcg(&mut st) % 2000) as f32 / 1000.0 - 1.0)
                    .collect();
                let y = matmul_t(&x, m, k, &w, n, format).unwrap();
                for r in 0..m {
                    for o in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * dense[o * k + i] as f64)
                            .sum();
                        let got = y[r * n + o] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{format:?} m={m} [{r}, {o}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dense_rows_match_the_product() {
        let (n, k) = (70, 45);
        let mut st = 5;
        let mut r = || (lcg(&mut st) % 2000) as f32 / 1000.0 - 1.0;
        let w: Vec<f32> = (0..n * k).map(|_| r()).collect();
        let x: Vec<f32> = (0..2 * k).map(|_| r()).collect();
        let y = matmul_t_f32(&x, 2, k, &w, n).unwrap();
        for row in 0..2 {
            for o in 0..n {
                let want: f64 = (0..k)
                    .map(|i| x[row * k + i] as f64 * w[o * k + i] as f64)
                    .sum();
                assert!((y[row * n + o] as f64 - want).abs() < 1e-4, "[{row}, {o}]");
            }
        }
        assert!(matmul_t_f32(&x, 2, k, &w[1..], n).is_err());
    }

    #[test]
    fn shapes_are_checked() {
        assert!(matmul_t(&[0.0; 31], 1, 31, &[0; 20], 1, BlockFormat::Q4_1).is_err());
        assert!(matmul_t(&[0.0; 32], 1, 32, &[0; 19], 1, BlockFormat::Q4_1).is_err());
    }
}
