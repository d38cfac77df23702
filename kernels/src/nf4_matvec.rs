//! NF4 weight rows times a few input rows (decoding, small batches): each 4-bit code is looked
//! up in a register (the block's scaled 16-value code book, one permute per 16 or 8 codes) and
//! multiplied into the inputs straight from the packed bytes, so a token reads half a byte per
//! weight and never writes a dequantized row.
//!
//! Every weight value is the same f32 product `code[q] * absmax` as
//! [`Nf4Matrix::dequantize`](crate::nf4::Nf4Matrix::dequantize) computes; only the order of the
//! dot product's additions differs from a dense matmul of the dequantized matrix.
//!
//! Layout: a row of `k` codes is `k / 2` bytes, element `2j` in byte `j`'s high nibble and
//! `2j + 1` in its low nibble. The inputs are split once per call into their even and odd
//! elements ([`SplitInput`]), so the high nibbles of a run of bytes meet one contiguous run
//! of inputs and the low nibbles the other: no shuffle of the weights is needed.

use crate::decode_isa::Level;

/// Most input rows a call takes (each is a register accumulator per lane group).
pub const MAX_INPUT_ROWS: usize = 8;

/// Bytes ahead of the current block that the next weights are prefetched (as in the GGML
/// row kernel: this Xeon's hardware prefetchers alone leave the loop waiting on memory).
const PREFETCH_BYTES: usize = 4096;

/// The instruction set the row kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// 16 codes per permute (`vpermps` on zmm).
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// 8 codes per pair of permutes and a blend.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// A table lookup per code.
    Generic,
}

impl Isa {
    /// Every instruction set this CPU can run the kernel with, plainest first.
    pub fn supported() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
            if std::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    /// The fastest of [`Isa::supported`] within [`crate::decode_isa::cap`], found once per
    /// process (decoding asks for it in every matvec).
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            crate::decode_isa::fastest(Self::supported(), Self::level)
                .expect("Generic is always supported")
        })
    }

    fn level(self) -> Level {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Level::Avx512,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Level::Avx2,
            Isa::Generic => Level::Generic,
        }
    }
}

/// Whether the row kernel takes a matrix of `cols` columns in blocks of `blocksize`: whole
/// blocks per row, each a whole number of 16-byte loads.
pub fn fits(blocksize: usize, cols: usize) -> bool {
    blocksize > 0 && blocksize.is_multiple_of(32) && cols.is_multiple_of(blocksize)
}

/// `m` input rows of `k` values, each split into its even and odd elements.
pub struct SplitInput {
    even: Vec<f32>,
    odd: Vec<f32>,
    half: usize,
    m: usize,
}

impl SplitInput {
    /// `x: [m, k]` row-major, `k` even.
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(2) && x.len() == m * k);
        let half = k / 2;
        let mut even = Vec::with_capacity(m * half);
        let mut odd = Vec::with_capacity(m * half);
        for pair in x.chunks_exact(2) {
            even.push(pair[0]);
            odd.push(pair[1]);
        }
        SplitInput { even, odd, half, m }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    fn even(&self, t: usize) -> &[f32] {
        &self.even[t * self.half..(t + 1) * self.half]
    }

    fn odd(&self, t: usize) -> &[f32] {
        &self.odd[t * self.half..(t + 1) * self.half]
    }
}

/// Weight rows `packed` (`out.len() / m` rows of `k / 2` bytes) times every input row of `x`,
/// into `out: [rows, m]`. `scales` holds each row's block absmax values in order
/// (`k / blocksize` per row). Shapes are checked; [`fits`] must hold.
pub fn rows(
    isa: Isa,
    code: &[f32; 16],
    blocksize: usize,
    packed: &[u8],
    scales: &[f32],
    x: &SplitInput,
    out: &mut [f32],
) {
    let (m, half) = (x.m, x.half);
    let k = 2 * half;
    assert!(fits(blocksize, k) && (1..=MAX_INPUT_ROWS).contains(&m));
    let n = out.len() / m;
    assert!(out.len() == n * m && packed.len() == n * half);
    assert!(scales.len() == n * (k / blocksize));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` found AVX-512F; the slices' lengths are checked above.
        Isa::Avx512 => unsafe { x86::rows_avx512(code, blocksize / 2, packed, scales, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` found AVX2 and FMA; lengths checked above.
        Isa::Avx2 => unsafe { x86::rows_avx2(code, blocksize / 2, packed, scales, x, out) },
        Isa::Generic => rows_generic(code, blocksize / 2, packed, scales, x, out),
    }
}

fn rows_generic(
    code: &[f32; 16],
    block_bytes: usize,
    packed: &[u8],
    scales: &[f32],
    x: &SplitInput,
    out: &mut [f32],
) {
    let (m, half) = (x.m, x.half);
    let blocks = half / block_bytes;
    for (i, slot) in out.chunks_exact_mut(m).enumerate() {
        let row = &packed[i * half..(i + 1) * half];
        for (t, y) in slot.iter_mut().enumerate() {
            let (xe, xo) = (x.even(t), x.odd(t));
            let mut sum = 0f32;
            for b in 0..blocks {
                let table = code.map(|c| c * scales[i * blocks + b]);
                for j in b * block_bytes..(b + 1) * block_bytes {
                    sum += table[(row[j] >> 4) as usize] * xe[j];
                    sum += table[(row[j] & 15) as usize] * xo[j];
                }
            }
            *y = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{SplitInput, PREFETCH_BYTES};

    #[inline(always)]
    unsafe fn sum512(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    /// `M` input rows at once: each 16-byte load of codes feeds `2 M` FMAs.
    #[inline(always)]
    unsafe fn rows_avx512_m<const M: usize>(
        code: &[f32; 16],
        block_bytes: usize,
        packed: &[u8],
        scales: &[f32],
        x: &SplitInput,
        out: &mut [f32],
    ) {
        let half = x.half;
        let blocks = half / block_bytes;
        let book = _mm512_loadu_ps(code.as_ptr());
        let xe: [*const f32; M] = std::array::from_fn(|t| x.even(t).as_ptr());
        let xo: [*const f32; M] = std::array::from_fn(|t| x.odd(t).as_ptr());
        for (i, slot) in out.chunks_exact_mut(M).enumerate() {
            let row = packed.as_ptr().add(i * half);
            let mut acc_even = [_mm512_setzero_ps(); M];
            let mut acc_odd = [_mm512_setzero_ps(); M];
            for b in 0..blocks {
                let table = _mm512_mul_ps(book, _mm512_set1_ps(scales[i * blocks + b]));
                let start = b * block_bytes;
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(start + PREFETCH_BYTES) as *const i8);
                for j in (start..start + block_bytes).step_by(16) {
                    let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(j) as *const __m128i));
                    // vpermps reads the low four bits of each index: the low nibble as it is.
                    let w_high = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(codes), table);
                    let w_low = _mm512_permutexvar_ps(codes, table);
                    for t in 0..M {
                        acc_even[t] =
                            _mm512_fmadd_ps(w_high, _mm512_loadu_ps(xe[t].add(j)), acc_even[t]);
                        acc_odd[t] =
                            _mm512_fmadd_ps(w_low, _mm512_loadu_ps(xo[t].add(j)), acc_odd[t]);
                    }
                }
            }
            for t in 0..M {
                slot[t] = sum512(_mm512_add_ps(acc_even[t], acc_odd[t]));
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn rows_avx512(
        code: &[f32; 16],
        block_bytes: usize,
        packed: &[u8],
        scales: &[f32],
        x: &SplitInput,
        out: &mut [f32],
    ) {
        match x.m {
            1 => rows_avx512_m::<1>(code, block_bytes, packed, scales, x, out),
            2 => rows_avx512_m::<2>(code, block_bytes, packed, scales, x, out),
            3 => rows_avx512_m::<3>(code, block_bytes, packed, scales, x, out),
            4 => rows_avx512_m::<4>(code, block_bytes, packed, scales, x, out),
            5 => rows_avx512_m::<5>(code, block_bytes, packed, scales, x, out),
            6 => rows_avx512_m::<6>(code, block_bytes, packed, scales, x, out),
            7 => rows_avx512_m::<7>(code, block_bytes, packed, scales, x, out),
            _ => rows_avx512_m::<8>(code, block_bytes, packed, scales, x, out),
        }
    }

    #[inline(always)]
    unsafe fn sum256(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
    }

    /// The 16-entry lookup on 8 lanes: each half of the table by `vpermps` (which reads the
    /// low three bits), the index's bit 3 (moved to the sign bit) choosing between them.
    #[inline(always)]
    unsafe fn lookup8(index: __m256i, low: __m256, high: __m256) -> __m256 {
        let pick_high = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(index));
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(low, index),
            _mm256_permutevar8x32_ps(high, index),
            pick_high,
        )
    }

    #[inline(always)]
    unsafe fn rows_avx2_m<const M: usize>(
        code: &[f32; 16],
        block_bytes: usize,
        packed: &[u8],
        scales: &[f32],
        x: &SplitInput,
        out: &mut [f32],
    ) {
        let half = x.half;
        let blocks = half / block_bytes;
        let (book_low, book_high) = (
            _mm256_loadu_ps(code.as_ptr()),
            _mm256_loadu_ps(code.as_ptr().add(8)),
        );
        let nibble = _mm256_set1_epi32(15);
        let xe: [*const f32; M] = std::array::from_fn(|t| x.even(t).as_ptr());
        let xo: [*const f32; M] = std::array::from_fn(|t| x.odd(t).as_ptr());
        for (i, slot) in out.chunks_exact_mut(M).enumerate() {
            let row = packed.as_ptr().add(i * half);
            let mut acc = [_mm256_setzero_ps(); M];
            let mut acc2 = [_mm256_setzero_ps(); M];
            for b in 0..blocks {
                let s = _mm256_set1_ps(scales[i * blocks + b]);
                let (low, high) = (_mm256_mul_ps(book_low, s), _mm256_mul_ps(book_high, s));
                let start = b * block_bytes;
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(start + PREFETCH_BYTES) as *const i8);
                for j in (start..start + block_bytes).step_by(8) {
                    let codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(j) as *const __m128i));
                    let w_high = lookup8(_mm256_srli_epi32::<4>(codes), low, high);
                    let w_low = lookup8(_mm256_and_si256(codes, nibble), low, high);
                    for t in 0..M {
                        acc[t] = _mm256_fmadd_ps(w_high, _mm256_loadu_ps(xe[t].add(j)), acc[t]);
                        acc2[t] = _mm256_fmadd_ps(w_low, _mm256_loadu_ps(xo[t].add(j)), acc2[t]);
                    }
                }
            }
            for t in 0..M {
                slot[t] = sum256(_mm256_add_ps(acc[t], acc2[t]));
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(
        code: &[f32; 16],
        block_bytes: usize,
        packed: &[u8],
        scales: &[f32],
        x: &SplitInput,
        out: &mut [f32],
    ) {
        match x.m {
            1 => rows_avx2_m::<1>(code, block_bytes, packed, scales, x, out),
            2 => rows_avx2_m::<2>(code, block_bytes, packed, scales, x, out),
            3 => rows_avx2_m::<3>(code, block_bytes, packed, scales, x, out),
            4 => rows_avx2_m::<4>(code, block_bytes, packed, scales, x, out),
            5 => rows_avx2_m::<5>(code, block_bytes, packed, scales, x, out),
            6 => rows_avx2_m::<6>(code, block_bytes, packed, scales, x, out),
            7 => rows_avx2_m::<7>(code, block_bytes, packed, scales, x, out),
            _ => rows_avx2_m::<8>(code, block_bytes, packed, scales, x, out),
        }
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

    /// The kernel on every supported instruction set against an f64 dot product of the
    /// elementwise-dequantized weights (high nibble first), for 1..=8 input rows.
    #[test]
    fn every_isa_matches_the_dequantized_product() {
        let code = crate::nf4::NF4_CODE;
        let (n, k, blocksize) = (37, 192, 64);
        let mut st = 7;
        let packed: Vec<u8> = (0..n * k / 2).map(|_| lcg(&mut st) as u8).collect();
        let scales: Vec<f32> = (0..n * k / blocksize)
            .map(|_| (lcg(&mut st) % 1000) as f32 / 700.0 + 0.01)
            .collect();
        let weight = |r: usize, c: usize| {
            let byte = packed[(r * k + c) / 2];
            let q = if c.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 15
            };
            (code[q as usize] * scales[(r * k + c) / blocksize]) as f64
        };
        for m in 1..=MAX_INPUT_ROWS {
            let x: Vec<f32> = (0..m * k)
                .map(|_| (lcg(&mut st) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let split = SplitInput::new(&x, m, k);
            for isa in Isa::supported() {
                let mut out = vec![f32::NAN; n * m];
                rows(isa, &code, blocksize, &packed, &scales, &split, &mut out);
                for r in 0..n {
                    for t in 0..m {
                        let want: f64 = (0..k).map(|c| weight(r, c) * x[t * k + c] as f64).sum();
                        let got = out[r * m + t] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{isa:?}, {m} rows: row {r} input {t}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fits_whole_blocks_of_32_only() {
        assert!(fits(64, 576) && fits(32, 96) && fits(256, 1536));
        assert!(!fits(64, 100) && !fits(16, 64) && !fits(0, 64) && !fits(48, 96));
    }
}
