//! `y = x · Wᵀ` for a few rows of f32 `x` (decoding) against a weight stored in GGML's
//! Q4_0, Q4_1, Q5_0 or Q8_0 blocks, read straight from the packed bytes, or dense in f32.
//!
//! Decoding streams each weight row once per call. For the block formats the activations are
//! rounded to 8 bits per 32-element block first (as GGML's own dot products do) so each block
//! is one integer dot product: 8-bit multiplies into 32-bit sums, AVX512-VNNI `vpdpbusd`
//! where the CPU has it, AVX2 `vpmaddubsw` otherwise, chosen at run time. Dequantizing to f32
//! and multiplying there costs several instructions per weight and made decoding
//! compute-bound at a quarter of the memory bandwidth. The offset terms (Q4_1's `m`, Q4_0's
//! `−8·d`, Q5_0's `−16·d`) use the sums of the rounded activations, as GGML does: the rounding
//! error then multiplies the weight itself, `d·q + m`. (Exact sums looked more accurate but put
//! the error on the unsigned code `d·q` instead, twice candle's error against the dense product
//! for Q4_0 on random weights.) Rows are split over the rayon threads.

use half::f16;
use rayon::prelude::*;

use crate::decode_isa::Level;

/// How far ahead of the block being read the kernels ask for weight bytes. Decoding streams
/// each weight once, and on the 2-core Xeon this project is built on the hardware prefetchers
/// left the loop waiting on memory: Q4_1 decoding ran at 72-73 tokens/s without this and
/// 106-122 with it (medians of 3 over 2-4 rounds: 1 KiB 95-97, 2 KiB 107-113, 3 KiB 118-119,
/// 4 KiB 114-122, 5 KiB 115-118, 6 KiB 115-133, 8 KiB 110-130).
const PREFETCH_BYTES: usize = 4096;

/// The block formats this kernel reads (32 elements per block, as GGML lays them out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// `{ d: f16, qs: [u8; 16] }`: `d · (q − 8)`, low nibbles first.
    Q4_0,
    /// `{ d: f16, m: f16, qs: [u8; 16] }`: `d · q + m`, low nibbles first.
    Q4_1,
    /// `{ d: f16, qs: [i8; 32] }`: `d · q`.
    Q8_0,
    /// `{ d: f16, qh: u32, qs: [u8; 16] }`: `d · (q − 16)` with `q` = nibble | bit `i` of
    /// `qh` << 4, low nibbles first (llama.cpp's Q4_K_M keeps most tensors of a model whose
    /// rows are not a multiple of 256 in it).
    Q5_0,
}

impl BlockFormat {
    pub const BLOCK: usize = 32;

    /// The format for a const-generic tag (0, 1, 2, 3 in declaration order).
    pub(crate) const fn from_tag(tag: u8) -> Self {
        match tag {
            0 => BlockFormat::Q4_0,
            1 => BlockFormat::Q4_1,
            2 => BlockFormat::Q8_0,
            _ => BlockFormat::Q5_0,
        }
    }

    /// The code that stands for zero in the symmetric formats (a weight is `d·(q − zero)`):
    /// 8 for Q4_0, 16 for Q5_0; 0 for Q8_0 (signed codes) and Q4_1 (which adds `m` instead).
    pub(crate) const fn zero_code(self) -> f32 {
        match self {
            BlockFormat::Q4_0 => 8.0,
            BlockFormat::Q5_0 => 16.0,
            BlockFormat::Q4_1 | BlockFormat::Q8_0 => 0.0,
        }
    }

    /// Bytes per block of 32 elements.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q5_0 => 22,
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
    let xq = Q8Rows::quantize(x, k);
    let isa = Isa::detect();
    Ok(rows_times(m, n, |o0, out| {
        isa.rows(format, &w[o0 * row_bytes..], &xq, m, out)
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
    #[cfg(target_arch = "x86_64")]
    if f32_rows_avx512() {
        return Ok(rows_times(m, n, |o0, out| {
            let rows = out.len() / m;
            // SAFETY: AVX-512F is present; the slices hold `rows` weight rows and `m` input
            // rows of `k` values.
            unsafe { x86::rows_f32_avx512(&w[o0 * k..(o0 + rows) * k], k, x, m, out) }
        }));
    }
    Ok(rows_times(m, n, |o0, out| {
        let rows = out.len() / m;
        rows_f32(&w[o0 * k..(o0 + rows) * k], k, x, m, out)
    }))
}

/// [`matmul_t_f32`]'s rows one at a time (AVX2 where the CPU has it).
fn rows_f32(w: &[f32], k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    for (i, slot) in out.chunks_mut(m).enumerate() {
        for (r, y) in slot.iter_mut().enumerate() {
            *y = dot_f32(&w[i * k..(i + 1) * k], &x[r * k..(r + 1) * k]);
        }
    }
}

/// Whether the f32 rows run on the AVX-512 kernel (`PEFT_DECODE_ISA=avx2` takes the AVX2 rows,
/// as a stand-in for CPUs without AVX-512).
#[cfg(target_arch = "x86_64")]
fn f32_rows_avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| {
        std::is_x86_feature_detected!("avx512f") && crate::decode_isa::cap() >= Level::Avx512
    })
}

/// `y: [m, n]` row-major from `m` input rows and `n` weight rows. Each task owns a range of
/// weight rows (read once, for every input row) and fills `out: [rows, m]` for it, through
/// `task(first_row, out)`; eight tasks per thread (at least 16 rows each), fewer and larger
/// than rayon's default splitting, which would cost more in scheduling than a decoding call's
/// work. Not fewer: a sleeping worker wakes some microseconds after the call began, and
/// small tasks let it take a fair share of what is left. On the 2-core Xeon (medians of 3,
/// two rounds, tokens/s, 2 then 8 tasks per thread): Q4_1 125 -> 155-165, Q8_0 96-100 ->
/// 110-112, Q4_K_M 93-100 -> 101-102, NF4 81-87 -> 85-89, dense f32 unchanged (31-34).
pub(crate) fn rows_times(m: usize, n: usize, task: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    rows_times_in(m, n, 1, task)
}

/// [`rows_times`] with every task's first row a multiple of `granule` and its `out` a whole
/// number of `granule` rows (the last task's may run past `n`; those rows are dropped).
pub(crate) fn rows_times_in(
    m: usize,
    n: usize,
    granule: usize,
    task: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    let granules = n.div_ceil(granule);
    let tasks = (rayon::current_num_threads() * 8).clamp(1, n.div_ceil(16).min(granules));
    let rows_per_task = granules.div_ceil(tasks) * granule;
    // Written transposed ([n, m]) so each task owns one contiguous range; m is small.
    let mut out_t = vec![0f32; granules * granule * m];
    out_t
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(t, chunk)| task(t * rows_per_task, chunk));
    out_t.truncate(n * m);
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for o in 0..n {
        for r in 0..m {
            out[r * n + o] = out_t[o * m + r];
        }
    }
    out
}

/// The instruction set the block kernels (and [`crate::kquant_matvec`]'s) run with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Generic,
}

impl Isa {
    /// Every instruction set this CPU can run the kernels with, plainest first.
    pub(crate) fn supported() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            isas.push(Isa::Avx2);
            if std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
            {
                isas.push(Isa::Vnni);
            }
        }
        isas
    }

    /// Its level for [`crate::decode_isa::cap`].
    fn level(self) -> Level {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => Level::Avx512,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Level::Avx2,
            Isa::Generic => Level::Generic,
        }
    }

    /// The fastest of [`Isa::supported`] within [`crate::decode_isa::cap`], found once per
    /// process (decoding asks for it in every matvec).
    pub(crate) fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            crate::decode_isa::fastest(Self::supported(), Self::level)
                .expect("Generic is always supported")
        })
    }

    /// Weight rows `rows[0..]` times every input row of `xq` into `out: [rows, m]`.
    fn rows(self, format: BlockFormat, rows: &[u8], xq: &Q8Rows, m: usize, out: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `supported` found the features these functions are compiled for.
            Isa::Vnni => unsafe { x86::rows_vnni(format, rows, xq, m, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::rows_avx2(format, rows, xq, m, out) },
            Isa::Generic => {
                let row_bytes = xq.k / BlockFormat::BLOCK * format.block_bytes();
                for (i, slot) in out.chunks_mut(m).enumerate() {
                    let row = &rows[i * row_bytes..(i + 1) * row_bytes];
                    for (r, y) in slot.iter_mut().enumerate() {
                        let (q, d, sum) = xq.row(r);
                        *y = dot_generic(format, row, q, d, sum);
                    }
                }
            }
        }
    }
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && crate::decode_isa::cap() >= Level::Avx2
        {
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

crate::rows::multiversion! {
    /// `q = round(x · inv)` rounding half away from zero (C's `roundf`, as GGML rounds),
    /// returning `Σq`. `|x · inv| ≤ 127` for a block's own `inv`; a NaN gives −127. Written
    /// without `f32::round` (a libm call below SSE4.1) and without `as i8` (a saturating cast
    /// LLVM does not vectorise), so the loop runs on vectors: rounding was ~3% of decoding.
    fn round_block(xs: &[f32], inv: f32, qs: &mut [i8]) -> i32 {
        let mut sum = 0i32;
        for (q, &x) in qs.iter_mut().zip(xs) {
            // `max`/`min` return the other operand for a NaN, so the conversion below always
            // sees a value in range (`clamp` would pass the NaN on).
            #[allow(clippy::manual_clamp)]
            let v = (x * inv).max(-128.0).min(128.0);
            // SAFETY: `v` is finite and within i32's range.
            let t = unsafe { v.to_int_unchecked::<i32>() }; // toward zero
            let frac = v - t as f32;
            let r = (t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32).clamp(-127, 127);
            *q = r as i8;
            sum += r;
        }
        sum
    }
}

/// `x` rounded to 8 bits per 32-element block, the form the integer dot products read:
/// `x ≈ d · q` with `d = max|x| / 127`, plus each block's sum `d · Σq` for the offset terms.
pub(crate) struct Q8Rows {
    /// Values per row.
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<f32>,
    /// `Σq` per block, exact (the tiled Q8_0 kernel's offset).
    q_sum: Vec<i32>,
}

impl Q8Rows {
    /// `x: [rows, k]` row-major; `k` a multiple of 32.
    pub(crate) fn quantize(x: &[f32], k: usize) -> Self {
        let blocks = x.len() / BlockFormat::BLOCK;
        let mut q = vec![0i8; x.len()];
        let (mut d, mut sum) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        let mut q_sums = Vec::with_capacity(blocks);
        for (xs, qs) in x
            .chunks_exact(BlockFormat::BLOCK)
            .zip(q.chunks_exact_mut(BlockFormat::BLOCK))
        {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            // GGML's own rounding (`1 / d`, not `127 / amax`), so a kept file decodes as
            // llama.cpp and candle decode it.
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let q_sum = round_block(xs, inv, qs);
            d.push(scale);
            sum.push(scale * q_sum as f32);
            q_sums.push(q_sum);
        }
        Q8Rows {
            k,
            q,
            d,
            sum,
            q_sum: q_sums,
        }
    }

    /// Input row `r`'s exact block sums `Σq`.
    pub(crate) fn q_sums(&self, r: usize) -> &[i32] {
        let blocks = self.k / BlockFormat::BLOCK;
        &self.q_sum[r * blocks..(r + 1) * blocks]
    }

    /// Input row `r`: its values, block scales and block sums.
    pub(crate) fn row(&self, r: usize) -> (&[i8], &[f32], &[f32]) {
        let blocks = self.k / BlockFormat::BLOCK;
        (
            &self.q[r * self.k..(r + 1) * self.k],
            &self.d[r * blocks..(r + 1) * blocks],
            &self.sum[r * blocks..(r + 1) * blocks],
        )
    }
}

/// The reference: integer sums per block, element by element.
fn dot_generic(format: BlockFormat, row: &[u8], x: &[i8], dx: &[f32], sx: &[f32]) -> f32 {
    let bytes = format.block_bytes();
    let scale = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let mut total = 0f32;
    for (((blk, xs), &d_x), &s_x) in row
        .chunks_exact(bytes)
        .zip(x.chunks_exact(32))
        .zip(dx)
        .zip(sx)
    {
        let d = scale(blk, 0);
        let mut acc = 0i32;
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let qs = &blk[bytes - 16..];
                for j in 0..16 {
                    acc += (qs[j] & 0x0F) as i32 * xs[j] as i32;
                    acc += (qs[j] >> 4) as i32 * xs[j + 16] as i32;
                }
            }
            BlockFormat::Q8_0 => {
                for j in 0..32 {
                    acc += blk[2 + j] as i8 as i32 * xs[j] as i32;
                }
            }
            BlockFormat::Q5_0 => {
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let qs = &blk[6..];
                for j in 0..16 {
                    let lo = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    acc += lo as i32 * xs[j] as i32 + hi as i32 * xs[j + 16] as i32;
                }
            }
        }
        total += d * d_x * acc as f32;
        total += match format {
            BlockFormat::Q4_1 => scale(blk, 2) * s_x,
            _ => -format.zero_code() * d * s_x,
        };
    }
    total
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{BlockFormat, Q8Rows, PREFETCH_BYTES};
    use std::arch::x86_64::*;

    /// The block's 32 weights as bytes in `x`'s order: Q4's low nibbles (elements 0..16) then
    /// high nibbles (16..32), unsigned; Q8_0's signed bytes as they are.
    #[inline(always)]
    unsafe fn weight_bytes(format: BlockFormat, blk: *const u8) -> __m256i {
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let at = format.block_bytes() - 16;
                let packed = _mm_loadu_si128(blk.add(at) as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
                _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
            }
            BlockFormat::Q8_0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
            BlockFormat::Q5_0 => {
                let packed = _mm_loadu_si128(blk.add(6) as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
                let nibbles = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
                // Byte i gets 0x10 where bit i of qh is set: spread qh's byte i/8 over
                // bytes i, test bit i%8 of each.
                let qh = (blk.add(2) as *const u32).read_unaligned() as i32;
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh),
                    _mm256_setr_epi8(
                        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                        3, 3, 3, 3, 3, 3, 3,
                    ),
                );
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                _mm256_or_si256(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
            }
        }
    }

    #[inline(always)]
    unsafe fn f16_at(blk: *const u8, at: usize) -> f32 {
        let bits = (blk.add(at) as *const u16).read_unaligned() as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// 8 lanes of 32-bit sums of `w · x` for unsigned `w` and signed `x`: one `vpdpbusd`
    /// with VNNI, else u8·i8 pairs summed to i16 (at most 2·128·127: no saturation) and
    /// then to i32.
    #[inline(always)]
    pub(crate) unsafe fn int_dot<const VNNI: bool>(w: __m256i, x: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
        }
    }

    /// Block `b` of the row added into `acc`; returns the block's offset term.
    /// (Plain `#[inline(always)]` functions, not closures: a closure is compiled without the
    /// caller's target features, and its intrinsics become calls.)
    #[inline(always)]
    unsafe fn one_block<const VNNI: bool>(
        format: BlockFormat,
        blk: *const u8,
        x: *const i8,
        dx: f32,
        sx: f32,
        acc: &mut __m256,
    ) -> f32 {
        let mut w = weight_bytes(format, blk);
        let mut xv = _mm256_loadu_si256(x as *const __m256i);
        if format == BlockFormat::Q8_0 {
            // Signed weights: |w| times sign(w)·x.
            xv = _mm256_sign_epi8(xv, w);
            w = _mm256_sign_epi8(w, w);
        }
        let d = f16_at(blk, 0);
        let sums = _mm256_cvtepi32_ps(int_dot::<VNNI>(w, xv));
        *acc = _mm256_fmadd_ps(sums, _mm256_set1_ps(d * dx), *acc);
        match format {
            BlockFormat::Q4_1 => f16_at(blk, 2) * sx,
            _ => -format.zero_code() * d * sx,
        }
    }

    /// The row's blocks, two at a time into two accumulators.
    #[inline(always)]
    unsafe fn blocks<const VNNI: bool>(
        format: BlockFormat,
        row: &[u8],
        x: &[i8],
        dx: &[f32],
        sx: &[f32],
    ) -> f32 {
        let bytes = format.block_bytes();
        let n = row.len() / bytes;
        assert!(x.len() >= n * 32 && dx.len() >= n && sx.len() >= n);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut offset_term = 0f32;
        let (w, xp) = (row.as_ptr(), x.as_ptr());
        let mut b = 0;
        while b + 2 <= n {
            offset_term += one_block::<VNNI>(
                format,
                w.add(b * bytes),
                xp.add(b * 32),
                dx[b],
                sx[b],
                &mut acc0,
            );
            offset_term += one_block::<VNNI>(
                format,
                w.add((b + 1) * bytes),
                xp.add((b + 1) * 32),
                dx[b + 1],
                sx[b + 1],
                &mut acc1,
            );
            b += 2;
        }
        if b < n {
            offset_term += one_block::<VNNI>(
                format,
                w.add(b * bytes),
                xp.add(b * 32),
                dx[b],
                sx[b],
                &mut acc0,
            );
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let one = _mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1));
        _mm_cvtss_f32(one) + offset_term
    }

    /// The four rows' f16 at byte `at`, as four f32 lanes.
    #[inline(always)]
    unsafe fn four_f16(w: &[*const u8; 4], at: usize) -> __m128 {
        let h = |r: usize| (w[r].add(at) as *const u16).read_unaligned() as u64 as i64;
        let packed = h(0) | (h(1) << 16) | (h(2) << 32) | (h(3) << 48);
        _mm_cvtph_ps(_mm_cvtsi64_si128(packed))
    }

    /// Four weight rows against one input row, block by block: the input block is loaded once
    /// for all four, the four rows' scales are converted together, and the four accumulators
    /// (plus one vector of offset terms) are independent chains.
    #[inline(always)]
    unsafe fn four_rows<const VNNI: bool>(
        format: BlockFormat,
        rows: [&[u8]; 4],
        x: &[i8],
        dx: &[f32],
        sx: &[f32],
        ahead: usize,
    ) -> [f32; 4] {
        let bytes = format.block_bytes();
        let n = rows[0].len() / bytes;
        assert!(rows.iter().all(|r| r.len() == n * bytes));
        assert!(x.len() >= n * 32 && dx.len() >= n && sx.len() >= n);
        let w = rows.map(|r| r.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut offsets = _mm_setzero_ps();
        for b in 0..n {
            let xv = _mm256_loadu_si256(x.as_ptr().add(b * 32) as *const __m256i);
            let d = four_f16(&w, b * bytes);
            let scales = _mm_mul_ps(d, _mm_set1_ps(dx[b]));
            let lanes = [
                _mm_shuffle_ps::<0x00>(scales, scales),
                _mm_shuffle_ps::<0x55>(scales, scales),
                _mm_shuffle_ps::<0xAA>(scales, scales),
                _mm_shuffle_ps::<0xFF>(scales, scales),
            ];
            for r in 0..4 {
                // See PREFETCH_BYTES.
                _mm_prefetch::<_MM_HINT_T0>(w[r].wrapping_add(b * bytes + ahead) as *const i8);
                let mut wv = weight_bytes(format, w[r].add(b * bytes));
                let mut xr = xv;
                if format == BlockFormat::Q8_0 {
                    xr = _mm256_sign_epi8(xv, wv);
                    wv = _mm256_sign_epi8(wv, wv);
                }
                let sums = _mm256_cvtepi32_ps(int_dot::<VNNI>(wv, xr));
                let d = _mm256_set_m128(lanes[r], lanes[r]);
                acc[r] = _mm256_fmadd_ps(sums, d, acc[r]);
            }
            match format {
                BlockFormat::Q4_1 => {
                    offsets =
                        _mm_fmadd_ps(four_f16(&w, b * bytes + 2), _mm_set1_ps(sx[b]), offsets);
                }
                BlockFormat::Q8_0 => {}
                BlockFormat::Q4_0 | BlockFormat::Q5_0 => {
                    let zero = format.zero_code();
                    offsets = _mm_fmadd_ps(d, _mm_set1_ps(-zero * sx[b]), offsets);
                }
            }
        }
        let mut off = [0f32; 4];
        _mm_storeu_ps(off.as_mut_ptr(), offsets);
        let mut out = [0f32; 4];
        for r in 0..4 {
            let half = _mm_add_ps(
                _mm256_castps256_ps128(acc[r]),
                _mm256_extractf128_ps(acc[r], 1),
            );
            let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
            let one = _mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1));
            out[r] = _mm_cvtss_f32(one) + off[r];
        }
        out
    }

    /// Dense f32 weight rows `w` (`out.len() / m` rows of `k`) times each of the `m` input
    /// rows of `x` into `out: [rows, m]`: four weight rows at a time, each input vector loaded
    /// once for the four (f32 decoding on the 2-core Xeon: 31-33 tokens/s with the AVX2 row
    /// at a time, 40-43 with this; prefetching the weights as the block kernel does changed
    /// nothing measurable here).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_f32_avx512(
        w: &[f32],
        k: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        let n = out.len() / m;
        assert!(w.len() == n * k && x.len() == m * k);
        let full = k / 16 * 16;
        let tail_mask: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
        let mut i = 0;
        while i < n {
            let count = (n - i).min(4);
            let rows: [*const f32; 4] =
                std::array::from_fn(|j| w.as_ptr().add((i + j.min(count - 1)) * k));
            for r in 0..m {
                let xr = x.as_ptr().add(r * k);
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut c = 0;
                while c < full {
                    let xv = _mm512_loadu_ps(xr.add(c));
                    for j in 0..4 {
                        acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[j].add(c)), xv, acc[j]);
                    }
                    c += 16;
                }
                if full < k {
                    let xv = _mm512_maskz_loadu_ps(tail_mask, xr.add(full));
                    for j in 0..4 {
                        let wv = _mm512_maskz_loadu_ps(tail_mask, rows[j].add(full));
                        acc[j] = _mm512_fmadd_ps(wv, xv, acc[j]);
                    }
                }
                for j in 0..count {
                    out[(i + j) * m + r] = _mm512_reduce_add_ps(acc[j]);
                }
            }
            i += count;
        }
    }

    /// Weight rows `rows[0..]` times every input row of `xq` into `out: [rows, m]`: four
    /// weight rows at a time, the rest one by one.
    #[inline(always)]
    unsafe fn rows_of<const VNNI: bool, const FORMAT: u8>(
        rows: &[u8],
        xq: &Q8Rows,
        m: usize,
        out: &mut [f32],
    ) {
        let format = BlockFormat::from_tag(FORMAT);
        let row_bytes = xq.k / BlockFormat::BLOCK * format.block_bytes();
        let n = out.len() / m;
        let row = |i: usize| &rows[i * row_bytes..(i + 1) * row_bytes];
        let mut i = 0;
        while i + 4 <= n {
            for r in 0..m {
                let (q, d, sum) = xq.row(r);
                let four = [row(i), row(i + 1), row(i + 2), row(i + 3)];
                let y = four_rows::<VNNI>(format, four, q, d, sum, PREFETCH_BYTES);
                for (j, v) in y.into_iter().enumerate() {
                    out[(i + j) * m + r] = v;
                }
            }
            i += 4;
        }
        for i in i..n {
            for r in 0..m {
                let (q, d, sum) = xq.row(r);
                out[i * m + r] = blocks::<VNNI>(format, row(i), q, d, sum);
            }
        }
    }

    /// One monomorphised loop per format (the format's branches fold away).
    #[inline(always)]
    unsafe fn rows_for<const VNNI: bool>(
        format: BlockFormat,
        rows: &[u8],
        xq: &Q8Rows,
        m: usize,
        out: &mut [f32],
    ) {
        match format {
            BlockFormat::Q4_0 => rows_of::<VNNI, 0>(rows, xq, m, out),
            BlockFormat::Q4_1 => rows_of::<VNNI, 1>(rows, xq, m, out),
            BlockFormat::Q8_0 => rows_of::<VNNI, 2>(rows, xq, m, out),
            BlockFormat::Q5_0 => rows_of::<VNNI, 3>(rows, xq, m, out),
        }
    }

    #[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn rows_vnni(
        format: BlockFormat,
        rows: &[u8],
        xq: &Q8Rows,
        m: usize,
        out: &mut [f32],
    ) {
        rows_for::<true>(format, rows, xq, m, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2(
        format: BlockFormat,
        rows: &[u8],
        xq: &Q8Rows,
        m: usize,
        out: &mut [f32],
    ) {
        rows_for::<false>(format, rows, xq, m, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_rounding_is_c_roundf() {
        // Halves (ties go away from zero), values next to them, the block's extremes, zero.
        let mut xs: Vec<f32> = (-254..=254).map(|h| h as f32 * 0.5).collect();
        for &v in &[0.5f32, 1.5, 126.5, -0.5, -2.5] {
            xs.push(f32::from_bits(v.to_bits() - 1));
            xs.push(f32::from_bits(v.to_bits() + 1));
        }
        xs.extend([127.0, -127.0, 0.0, -0.0, 0.49999997, -0.49999997]);
        xs.resize(xs.len().next_multiple_of(32), 0.3);
        let mut qs = vec![0i8; xs.len()];
        let sum = round_block(&xs, 1.0, &mut qs);
        for (&x, &q) in xs.iter().zip(&qs) {
            assert_eq!(q, x.round() as i8, "round({x})");
        }
        assert_eq!(sum, qs.iter().map(|&q| q as i32).sum::<i32>());
        let mut nan = [0i8; 2];
        round_block(&[f32::NAN, 1.0], 1.0, &mut nan);
        assert_eq!(nan, [-127, 1]);
    }

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
                BlockFormat::Q5_0 => {
                    let qh = (lcg(&mut st) as u32) ^ ((lcg(&mut st) as u32) << 16);
                    let qs: Vec<u8> = (0..16).map(|_| (lcg(&mut st) % 256) as u8).collect();
                    bytes.extend_from_slice(&qh.to_le_bytes());
                    bytes.extend_from_slice(&qs);
                    let mut block = [0f32; 32];
                    for j in 0..16 {
                        let lo = (qs[j] & 15) as u32 + ((qh >> j) & 1) * 16;
                        let hi = (qs[j] >> 4) as u32 + ((qh >> (j + 16)) & 1) * 16;
                        block[j] = d * (lo as f32 - 16.0);
                        block[j + 16] = d * (hi as f32 - 16.0);
                    }
                    dense.extend_from_slice(&block);
                }
            }
        }
        (bytes, dense)
    }

    /// The test's own rounding of x (max|x|/127 per block, round half away from zero).
    fn rounded(x: &[f32]) -> Vec<f64> {
        x.chunks(32)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                b.iter()
                    .map(move |v| if d > 0.0 { (v / d).round() * d } else { 0.0 } as f64)
            })
            .collect()
    }

    #[test]
    fn every_format_matches_the_dequantized_product() {
        let (n, k) = (150, 96);
        for format in [
            BlockFormat::Q4_0,
            BlockFormat::Q4_1,
            BlockFormat::Q8_0,
            BlockFormat::Q5_0,
        ] {
            let (w, dense) = random_matrix(format, n, k, 7);
            for m in [1, 3] {
                let mut st = 99;
                let x: Vec<f32> = (0..m * k)
                    .map(|_| (lcg(&mut st) % 2000) as f32 / 1000.0 - 1.0)
                    .collect();
                let xr = rounded(&x);
                let y = matmul_t(&x, m, k, &w, n, format).unwrap();
                for r in 0..m {
                    for o in 0..n {
                        let wrow = &dense[o * k..(o + 1) * k];
                        let xrow = &x[r * k..(r + 1) * k];
                        let want_exact: f64 = (0..k).map(|i| xrow[i] as f64 * wrow[i] as f64).sum();
                        let want_rounded: f64 =
                            (0..k).map(|i| xr[r * k + i] * wrow[i] as f64).sum();
                        let got = y[r * n + o] as f64;
                        // Rounding x moves each term by at most |w|·d/2.
                        let bound: f64 = (0..k)
                            .map(|i| {
                                let b = &xrow[i / 32 * 32..i / 32 * 32 + 32];
                                let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                                (wrow[i] as f64).abs() * d as f64 / 2.0
                            })
                            .sum();
                        assert!(
                            (got - want_exact).abs() <= bound + 1e-4,
                            "{format:?} m={m} [{r}, {o}]: {got} vs exact {want_exact} (bound {bound})"
                        );
                        // Every term, offsets included, sees the rounded x.
                        assert!(
                            (got - want_rounded).abs() < 1e-4 * (1.0 + want_rounded.abs()),
                            "{format:?} m={m} [{r}, {o}]: {got} vs {want_rounded}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_simd_paths_agree_with_the_scalar_one() {
        let (n, k) = (9, 32 * 7);
        for format in [
            BlockFormat::Q4_0,
            BlockFormat::Q4_1,
            BlockFormat::Q8_0,
            BlockFormat::Q5_0,
        ] {
            let (w, _) = random_matrix(format, n, k, 3);
            let mut st = 11;
            // Extreme activations too: a block of zeros and a block at ±max.
            let mut x: Vec<f32> = (0..k)
                .map(|_| (lcg(&mut st) % 2000) as f32 / 100.0 - 10.0)
                .collect();
            x[32..64].fill(0.0);
            for (i, v) in x[64..96].iter_mut().enumerate() {
                *v = if i % 2 == 0 { 7.5 } else { -7.5 };
            }
            let xq = Q8Rows::quantize(&x, k);
            let row_bytes = k / 32 * format.block_bytes();
            let want: Vec<f32> = (0..n)
                .map(|o| {
                    let row = &w[o * row_bytes..(o + 1) * row_bytes];
                    dot_generic(format, row, &xq.q, &xq.d, &xq.sum)
                })
                .collect();
            let check = |name: &str, got: &[f32]| {
                for (o, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{format:?} {name} row {o}: {g} vs scalar {e}"
                    );
                }
            };
            for isa in Isa::supported() {
                let mut out = vec![0f32; n];
                isa.rows(format, &w, &xq, 1, &mut out);
                check(&format!("{isa:?}"), &out);
            }
            check("dispatched", &matmul_t(&x, 1, k, &w, n, format).unwrap());
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
        // Each kernel directly too, out: [n, 2].
        let mut kernels: Vec<Vec<f32>> = vec![];
        let mut out = vec![0f32; 2 * n];
        rows_f32(&w, k, &x, 2, &mut out);
        kernels.push(out.clone());
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: checked just above; the shapes match.
            unsafe { x86::rows_f32_avx512(&w, k, &x, 2, &mut out) };
            kernels.push(out);
        }
        for row in 0..2 {
            for o in 0..n {
                let want: f64 = (0..k)
                    .map(|i| x[row * k + i] as f64 * w[o * k + i] as f64)
                    .sum();
                assert!((y[row * n + o] as f64 - want).abs() < 1e-4, "[{row}, {o}]");
                for (which, got) in kernels.iter().enumerate() {
                    let got = got[o * 2 + row] as f64;
                    assert!((got - want).abs() < 1e-4, "kernel {which} [{row}, {o}]");
                }
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
