//! `y = x · Wᵀ` for a few rows of f32 `x` (decoding) against a weight stored in GGML's
//! Q4_K or Q6_K super-blocks (256 elements each), read straight from the packed bytes. These
//! are the types llama.cpp's Q4_K_M export gives the projections whose rows are a multiple of
//! 256 (in SmolLM2, the down projections); they ran on candle's quantized matmul before.
//!
//! The activations are rounded to 8 bits per 32-element block exactly as for the 32-element
//! formats ([`crate::ggml_matvec`]), so each 32-element piece of a super-block is one integer
//! dot product: Q4_K's pieces have one scale and one minimum each, Q6_K's two scales (one per
//! 16 elements), which the 8 lanes of 32-bit sums keep apart (lanes 0-3 sum elements 0-15).

use half::f16;

use crate::ggml_matvec::{rows_times, Isa, Q8Rows};

/// The super-block formats this kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperFormat {
    /// `{ d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128] }`: piece `j` of 32 elements is
    /// `d · sc_j · q − dmin · m_j` (6-bit `sc_j`, `m_j` packed in `scales`), its nibbles the
    /// low (even `j`) or high (odd `j`) halves of bytes `32 · (j / 2)..`.
    Q4K,
    /// `{ ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 }`: element `e` is
    /// `d · scales[e / 16] · (q − 32)` with 6-bit `q` = 4 low bits from `ql`, 2 high from `qh`.
    Q6K,
}

impl SuperFormat {
    /// Elements per super-block.
    pub const ELEMENTS: usize = 256;

    /// Bytes per super-block.
    pub fn block_bytes(self) -> usize {
        match self {
            SuperFormat::Q4K => 144,
            SuperFormat::Q6K => 210,
        }
    }
}

/// `y: [m, n]` for `x: [m, k]` row-major and `W: [n, k]` as `n` rows of `k / 256`
/// super-blocks. `k` must be a multiple of 256 and `w` exactly that many blocks (checked).
pub fn matmul_t(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    format: SuperFormat,
) -> Result<Vec<f32>, String> {
    if !k.is_multiple_of(SuperFormat::ELEMENTS) {
        return Err(format!(
            "{k} columns are not a whole number of 256-element super-blocks"
        ));
    }
    let row_bytes = k / SuperFormat::ELEMENTS * format.block_bytes();
    if w.len() != n * row_bytes || x.len() != m * k {
        return Err(format!(
            "{} weight bytes and {} inputs for [{n}, {k}] {format:?} and {m} rows",
            w.len(),
            x.len()
        ));
    }
    let xq = Q8Rows::quantize(x, k);
    let isa = Isa::detect();
    Ok(rows_times(m, n, |o0, out| {
        for (i, slot) in out.chunks_mut(m).enumerate() {
            let o = o0 + i;
            let row = &w[o * row_bytes..(o + 1) * row_bytes];
            for (r, y) in slot.iter_mut().enumerate() {
                let (q, d, sum) = xq.row(r);
                *y = dot(isa, format, row, q, d, sum);
            }
        }
    }))
}

/// Q4_K's 6-bit scale and minimum of piece `j` (GGML's `get_scale_min_k4`).
#[inline(always)]
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q6_K's 6-bit code of element `l` (0..32) of piece `j` (0..4) in half `h` of a super-block.
#[inline(always)]
fn q6(blk: &[u8], h: usize, j: usize, l: usize) -> i32 {
    let (ql, qh) = (&blk[64 * h..], &blk[128 + 32 * h..]);
    let low = match j {
        0 => ql[l] & 15,
        1 => ql[32 + l] & 15,
        2 => ql[l] >> 4,
        _ => ql[32 + l] >> 4,
    };
    let high = (qh[l] >> (2 * j)) & 3;
    (low | (high << 4)) as i32
}

/// The reference: integer sums per 32-element piece, element by element.
fn dot_generic(format: SuperFormat, row: &[u8], x: &[i8], dx: &[f32], sx: &[f32]) -> f32 {
    let mut total = 0f32;
    for (s, blk) in row.chunks_exact(format.block_bytes()).enumerate() {
        match format {
            SuperFormat::Q4K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (scales, qs) = (&blk[4..16], &blk[16..]);
                for j in 0..8 {
                    let (sc, mn) = scale_min(j, scales);
                    let b = 8 * s + j;
                    let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                    let acc: i32 = (0..32)
                        .map(|l| {
                            let q = if j % 2 == 0 {
                                bytes[l] & 15
                            } else {
                                bytes[l] >> 4
                            };
                            q as i32 * x[32 * b + l] as i32
                        })
                        .sum();
                    total += d * sc as f32 * dx[b] * acc as f32 - dmin * mn as f32 * sx[b];
                }
            }
            SuperFormat::Q6K => {
                let d = f16_at(blk, 208);
                for h in 0..2 {
                    for j in 0..4 {
                        let b = 8 * s + 4 * h + j;
                        for g in 0..2 {
                            let sc = blk[192 + 8 * h + 2 * j + g] as i8 as f32;
                            let acc: i32 = (16 * g..16 * g + 16)
                                .map(|l| (q6(blk, h, j, l) - 32) * x[32 * b + l] as i32)
                                .sum();
                            total += d * sc * dx[b] * acc as f32;
                        }
                    }
                }
            }
        }
    }
    total
}

/// One row's dot product on `isa` (the 32-element kernels' instruction sets: the same CPU
/// features, and the same `PEFT_DECODE_ISA` cap).
fn dot(isa: Isa, format: SuperFormat, row: &[u8], x: &[i8], dx: &[f32], sx: &[f32]) -> f32 {
    let blocks = row.len() / format.block_bytes();
    assert!(x.len() >= blocks * 256 && dx.len() >= blocks * 8 && sx.len() >= blocks * 8);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::supported` found the features; the lengths are checked above.
        Isa::Vnni => unsafe { x86::dot_vnni(format, row, x, dx, sx) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::dot_avx2(format, row, x, dx, sx) },
        Isa::Generic => dot_generic(format, row, x, dx, sx),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{f16_at, scale_min, SuperFormat};
    // 8 lanes of 32-bit sums of `w · x`, each lane four consecutive elements.
    use crate::ggml_matvec::x86::int_dot;

    /// Bytes ahead that the weights are prefetched (as in the 32-element kernel).
    const PREFETCH_BYTES: usize = 4096;

    #[inline(always)]
    unsafe fn sum8(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
    }

    #[inline(always)]
    unsafe fn q4k_row<const VNNI: bool>(row: &[u8], x: &[i8], dx: &[f32], sx: &[f32]) -> f32 {
        let low4 = _mm256_set1_epi8(0x0F);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut offsets = 0f32;
        for (s, blk) in row.chunks_exact(144).enumerate() {
            _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(PREFETCH_BYTES) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(PREFETCH_BYTES + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(
                blk.as_ptr().wrapping_add(PREFETCH_BYTES + 128) as *const i8
            );
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let scales = &blk[4..16];
            for p in 0..4 {
                let bytes = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * p) as *const __m256i);
                let lo = _mm256_and_si256(bytes, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low4);
                let (j0, j1) = (2 * p, 2 * p + 1);
                let (b0, b1) = (8 * s + j0, 8 * s + j1);
                let (sc0, m0) = scale_min(j0, scales);
                let (sc1, m1) = scale_min(j1, scales);
                let x0 = _mm256_loadu_si256(x.as_ptr().add(32 * b0) as *const __m256i);
                let x1 = _mm256_loadu_si256(x.as_ptr().add(32 * b1) as *const __m256i);
                let s0 = _mm256_cvtepi32_ps(int_dot::<VNNI>(lo, x0));
                let s1 = _mm256_cvtepi32_ps(int_dot::<VNNI>(hi, x1));
                acc0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(d * sc0 as f32 * dx[b0]), acc0);
                acc1 = _mm256_fmadd_ps(s1, _mm256_set1_ps(d * sc1 as f32 * dx[b1]), acc1);
                offsets += dmin * (m0 as f32 * sx[b0] + m1 as f32 * sx[b1]);
            }
        }
        sum8(_mm256_add_ps(acc0, acc1)) - offsets
    }

    #[inline(always)]
    unsafe fn q6k_row<const VNNI: bool>(row: &[u8], x: &[i8], dx: &[f32]) -> f32 {
        let low4 = _mm256_set1_epi8(0x0F);
        let two = _mm256_set1_epi8(0x30);
        let offset = _mm256_set1_epi8(32);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (s, blk) in row.chunks_exact(210).enumerate() {
            for ahead in [0, 64, 128, 192] {
                _mm_prefetch::<_MM_HINT_T0>(
                    blk.as_ptr().wrapping_add(PREFETCH_BYTES + ahead) as *const i8
                );
            }
            let d = f16_at(blk, 208);
            for h in 0..2 {
                let ql_a = _mm256_loadu_si256(blk.as_ptr().add(64 * h) as *const __m256i);
                let ql_b = _mm256_loadu_si256(blk.as_ptr().add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(blk.as_ptr().add(128 + 32 * h) as *const __m256i);
                // Piece j's codes: 4 low bits | 2 high bits (qh >> 2j) << 4.
                let pieces = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql_a, low4),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql_b, low4),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql_a), low4),
                        _mm256_and_si256(qh, two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql_b), low4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), two),
                    ),
                ];
                for (j, w) in pieces.into_iter().enumerate() {
                    let b = 8 * s + 4 * h + j;
                    let xv = _mm256_loadu_si256(x.as_ptr().add(32 * b) as *const __m256i);
                    // Σ (q − 32)·x per lane: the codes are unsigned, the offset apart.
                    let sums =
                        _mm256_sub_epi32(int_dot::<VNNI>(w, xv), int_dot::<VNNI>(offset, xv));
                    let sc = 192 + 8 * h + 2 * j;
                    let dd = d * dx[b];
                    let scale = _mm256_set_m128(
                        _mm_set1_ps(blk[sc + 1] as i8 as f32 * dd),
                        _mm_set1_ps(blk[sc] as i8 as f32 * dd),
                    );
                    if j % 2 == 0 {
                        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc0);
                    } else {
                        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc1);
                    }
                }
            }
        }
        sum8(_mm256_add_ps(acc0, acc1))
    }

    #[inline(always)]
    unsafe fn dot_of<const VNNI: bool>(
        format: SuperFormat,
        row: &[u8],
        x: &[i8],
        dx: &[f32],
        sx: &[f32],
    ) -> f32 {
        match format {
            SuperFormat::Q4K => q4k_row::<VNNI>(row, x, dx, sx),
            SuperFormat::Q6K => q6k_row::<VNNI>(row, x, dx),
        }
    }

    #[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn dot_vnni(
        format: SuperFormat,
        row: &[u8],
        x: &[i8],
        dx: &[f32],
        sx: &[f32],
    ) -> f32 {
        dot_of::<true>(format, row, x, dx, sx)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(
        format: SuperFormat,
        row: &[u8],
        x: &[i8],
        dx: &[f32],
        sx: &[f32],
    ) -> f32 {
        dot_of::<false>(format, row, x, dx, sx)
    }
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

    /// Random super-blocks (small positive f16 scales, any codes) and their values, element
    /// by element from GGML's dequantization loops (not from this module's helpers).
    fn random_row(format: SuperFormat, blocks: usize, st: &mut u64) -> (Vec<u8>, Vec<f64>) {
        let mut bytes = vec![];
        let mut values = vec![];
        for _ in 0..blocks {
            let mut blk: Vec<u8> = (0..format.block_bytes()).map(|_| lcg(st) as u8).collect();
            let small = |st: &mut u64| f16::from_f32((lcg(st) % 1000) as f32 / 40000.0 + 0.001);
            match format {
                SuperFormat::Q4K => {
                    blk[0..2].copy_from_slice(&small(st).to_le_bytes());
                    blk[2..4].copy_from_slice(&small(st).to_le_bytes());
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f64();
                    let dmin = f16::from_le_bytes([blk[2], blk[3]]).to_f64();
                    let q = &blk[4..16];
                    let sm = |j: usize| -> (f64, f64) {
                        if j < 4 {
                            ((q[j] & 63) as f64, (q[j + 4] & 63) as f64)
                        } else {
                            (
                                ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as f64,
                                ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f64,
                            )
                        }
                    };
                    let qs = &blk[16..];
                    for chunk in 0..4 {
                        let (sc1, m1) = sm(2 * chunk);
                        let (sc2, m2) = sm(2 * chunk + 1);
                        let bytes = &qs[32 * chunk..32 * chunk + 32];
                        values.extend(
                            bytes
                                .iter()
                                .map(|&b| d * sc1 * (b & 0xF) as f64 - dmin * m1),
                        );
                        values.extend(bytes.iter().map(|&b| d * sc2 * (b >> 4) as f64 - dmin * m2));
                    }
                }
                SuperFormat::Q6K => {
                    blk[208..210].copy_from_slice(&small(st).to_le_bytes());
                    let d = f16::from_le_bytes([blk[208], blk[209]]).to_f64();
                    let mut y = vec![0f64; 256];
                    for half in 0..2 {
                        let (ql, qh, sc) = (
                            &blk[64 * half..],
                            &blk[128 + 32 * half..],
                            &blk[192 + 8 * half..],
                        );
                        for l in 0..32 {
                            let is = l / 16;
                            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                            let s = |i: usize| sc[i] as i8 as f64;
                            y[128 * half + l] = d * s(is) * q1 as f64;
                            y[128 * half + l + 32] = d * s(is + 2) * q2 as f64;
                            y[128 * half + l + 64] = d * s(is + 4) * q3 as f64;
                            y[128 * half + l + 96] = d * s(is + 6) * q4 as f64;
                        }
                    }
                    values.extend(y);
                }
            }
            bytes.extend(blk);
        }
        (bytes, values)
    }

    /// Every instruction set against the dequantized weights times the rounded activations
    /// (the exact value of what the kernel computes, up to f32 summation).
    #[test]
    fn every_isa_matches_the_dequantized_rows() {
        let (n, k) = (5, 512);
        let mut st = 11;
        for format in [SuperFormat::Q4K, SuperFormat::Q6K] {
            let mut w = vec![];
            let mut dense = vec![];
            for _ in 0..n {
                let (b, v) = random_row(format, k / 256, &mut st);
                w.extend(b);
                dense.extend(v);
            }
            let x: Vec<f32> = (0..2 * k)
                .map(|_| (lcg(&mut st) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let xq = Q8Rows::quantize(&x, k);
            let row_bytes = k / 256 * format.block_bytes();
            for isa in Isa::supported() {
                for o in 0..n {
                    for r in 0..2 {
                        let (q, d, sum) = xq.row(r);
                        let got = dot(
                            isa,
                            format,
                            &w[o * row_bytes..(o + 1) * row_bytes],
                            q,
                            d,
                            sum,
                        );
                        let want: f64 = (0..k)
                            .map(|i| dense[o * k + i] * (q[i] as f64 * d[i / 32] as f64))
                            .sum();
                        let size: f64 = (0..k)
                            .map(|i| (dense[o * k + i] * x[r * k + i] as f64).abs())
                            .sum();
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + size),
                            "{format:?} {isa:?} row {o} input {r}: {got} vs {want}"
                        );
                    }
                }
            }
            let y = matmul_t(&x, 2, k, &w, n, format).unwrap();
            assert_eq!(y.len(), 2 * n);
            assert!(matmul_t(&x, 2, k, &w[1..], n, format).is_err());
            assert!(matmul_t(&x[..2 * 256], 2, 256, &w, n, format).is_err());
        }
    }
}
