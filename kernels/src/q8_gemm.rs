//! Integer GEMM for training over a quantized base: `y = x·Wᵀ` with `W` held as 8-bit integers
//! in blocks of 64 along the reduction (one f32 scale per block, as GGML's Q8_0 but 64 wide)
//! and `x` rounded to 8 bits per block of 64 on the way in. On AVX512-VNNI one `vpdpbusd`
//! does 64 multiply-adds (16 outputs × 4 reduction steps), four times an f32 FMA's 16.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the activations are stored offset by
//! 128 (`u = q + 128`, 1..=255) and each weight block carries `128·Σ w` to subtract:
//! `Σ u·w = Σ q·w + 128·Σ w`. Per block the integer sum is scaled by `d_x · d_w` into an f32
//! accumulator, so the result equals the exact product of the two 8-bit approximations (up to
//! f32 rounding of the per-block sums); the rounding of `x` and `W` to 8 bits per block is the
//! only approximation (≤ 1/254 of each block's largest magnitude, per element).
//!
//! Weight layout, for the kernel's 16-lane tiles: tile `t` (rows `16t..16t+16`), block `b`,
//! group `g` (reduction steps `64b + 4g .. +4`) is 64 bytes, lane `l` holding row `16t + l`'s
//! four values. Rows past the end of the matrix are zero.

use rayon::prelude::*;

/// Values per block along the reduction (the scale granularity), for weights and activations.
pub const BLOCK: usize = 64;
const LANES: usize = 16;
/// Bytes of one tile-block: 16 rows × 64 values.
const TILE_BLOCK: usize = LANES * BLOCK;

/// A weight matrix `[rows, cols]` in 8-bit blocks along `cols`, packed for [`matmul_t`].
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    tiles: usize,
    blocks: usize,
    data: Vec<i8>,
    /// `[tile][block][lane]`: the block's scale.
    scales: Vec<f32>,
    /// `[tile][block][lane]`: `128 · Σ w` over the block.
    offsets: Vec<i32>,
}

/// Why a matrix cannot be used by the integer GEMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Q8Error {
    /// The reduction length is not a multiple of [`BLOCK`].
    Cols(usize),
    /// A slice's length does not match the shape it was given with.
    Len {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

impl std::fmt::Display for Q8Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Q8Error::Cols(c) => write!(
                f,
                "q8 gemm: reduction length {c} is not a multiple of {BLOCK}"
            ),
            Q8Error::Len {
                what,
                expected,
                got,
            } => {
                write!(f, "q8 gemm: {what} has {got} values, expected {expected}")
            }
        }
    }
}

impl std::error::Error for Q8Error {}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), Q8Error> {
    if expected == got {
        Ok(())
    } else {
        Err(Q8Error::Len {
            what,
            expected,
            got,
        })
    }
}

/// Rounds one block to 8 bits: returns the scale and writes `round(v / scale)` (|q| ≤ 127).
fn quantize_block(values: impl Iterator<Item = f32> + Clone, out: &mut [i8]) -> f32 {
    let amax = values.clone().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        out.fill(0);
        return if amax.is_finite() { 0.0 } else { f32::NAN };
    }
    let scale = amax / 127.0;
    let inv = 127.0 / amax;
    for (o, v) in out.iter_mut().zip(values) {
        *o = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    scale
}

impl Q8Matrix {
    /// `w: [rows, cols]` row-major, rounded to 8 bits per block of 64 along `cols`.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self, Q8Error> {
        check_len("weight", rows * cols, w.len())?;
        Self::build(rows, cols, |r, c| w[r * cols + c])
    }

    /// The matrix `wᵀ: [cols, rows]` for `w: [rows, cols]` row-major, so that
    /// `matmul_t(dy, &Q8Matrix::quantize_transposed(w, ..))` is `dy·W` (a layer's input gradient).
    pub fn quantize_transposed(w: &[f32], rows: usize, cols: usize) -> Result<Self, Q8Error> {
        check_len("weight", rows * cols, w.len())?;
        Self::build(cols, rows, |r, c| w[c * cols + r])
    }

    fn build(
        rows: usize,
        cols: usize,
        at: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Result<Self, Q8Error> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(Q8Error::Cols(cols));
        }
        let tiles = rows.div_ceil(LANES);
        let blocks = cols / BLOCK;
        let mut data = vec![0i8; tiles * blocks * TILE_BLOCK];
        let mut scales = vec![0f32; tiles * blocks * LANES];
        let mut offsets = vec![0i32; tiles * blocks * LANES];
        let isa = Isa::detect();
        data.par_chunks_mut(blocks * TILE_BLOCK)
            .zip(scales.par_chunks_mut(blocks * LANES))
            .zip(offsets.par_chunks_mut(blocks * LANES))
            .enumerate()
            .for_each(|(t, ((data, scales), offsets))| {
                // The tile's 16 rows gathered (reduction index outer: the transposed source
                // then reads 16 neighbours at a time), then rounded row by row as activations
                // are, and packed.
                let lanes = rows.saturating_sub(t * LANES).min(LANES);
                let mut buf = vec![0f32; LANES * cols];
                for c in 0..cols {
                    for lane in 0..lanes {
                        buf[lane * cols + c] = at(t * LANES + lane, c);
                    }
                }
                let (mut q, mut s) = (vec![0u8; cols], vec![0f32; blocks]);
                for lane in 0..lanes {
                    quantize_row(isa, &buf[lane * cols..(lane + 1) * cols], &mut q, &mut s);
                    for b in 0..blocks {
                        let block = &q[b * BLOCK..(b + 1) * BLOCK];
                        scales[b * LANES + lane] = s[b];
                        offsets[b * LANES + lane] =
                            128 * block.iter().map(|&u| u as i32 - 128).sum::<i32>();
                        let tb = &mut data[b * TILE_BLOCK..(b + 1) * TILE_BLOCK];
                        for (i, &u) in block.iter().enumerate() {
                            tb[(i / 4) * (LANES * 4) + lane * 4 + i % 4] = (u as i16 - 128) as i8;
                        }
                    }
                }
            });
        Ok(Q8Matrix {
            rows,
            cols,
            tiles,
            blocks,
            data,
            scales,
            offsets,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (values, scales and offsets).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    /// The matrix the integer products see, `[rows, cols]` row-major (tests, diagnostics).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            let (t, lane) = (r / LANES, r % LANES);
            for c in 0..self.cols {
                let (b, i) = (c / BLOCK, c % BLOCK);
                let q = self.data
                    [(t * self.blocks + b) * TILE_BLOCK + (i / 4) * (LANES * 4) + lane * 4 + i % 4];
                w[r * self.cols + c] = q as f32 * self.scales[(t * self.blocks + b) * LANES + lane];
            }
        }
        w
    }
}

/// Rows `[rows, cols]` of f32 values rounded to 8 bits per block of 64 (one scale each),
/// stored offset by 128: the integer GEMM's activations, and a quarter-size copy of a tensor
/// kept only for a backward ([`Q8Rows::new`], [`Q8Rows::to_f32`]).
pub struct Q8Rows {
    cols: usize,
    blocks: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
}

impl Q8Rows {
    /// `x: [rows, cols]` row-major, `cols` a multiple of [`BLOCK`].
    pub fn new(x: &[f32], rows: usize, cols: usize) -> Result<Self, Q8Error> {
        check_len("rows", rows * cols, x.len())?;
        if !cols.is_multiple_of(BLOCK) {
            return Err(Q8Error::Cols(cols));
        }
        Ok(Self::quantize(Isa::detect(), x, rows, cols))
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.cols.max(1)
    }

    /// The values as rounded, `[rows, cols]` row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        // Not zeroed first (`memset` showed in the step): every element is written below.
        let n = self.data.len();
        let mut out: Vec<f32> = Vec::with_capacity(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(BLOCK * 64)
            .zip(self.data.par_chunks(BLOCK * 64))
            .zip(self.scales.par_chunks(64))
            .for_each(|((out, data), scales)| {
                for ((out, data), &s) in out.chunks_mut(BLOCK).zip(data.chunks(BLOCK)).zip(scales) {
                    for (o, &u) in out.iter_mut().zip(data) {
                        o.write((u as i32 - 128) as f32 * s);
                    }
                }
            });
        // SAFETY: `data` holds whole blocks of BLOCK values (one scale each), so the loop above
        // wrote all n elements.
        unsafe { out.set_len(n) };
        out
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }

    fn quantize(isa: Isa, x: &[f32], rows: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        // Not zeroed first (`memset` showed in the step): every byte and scale is written.
        let mut data: Vec<u8> = Vec::with_capacity(rows * cols);
        let mut scales: Vec<f32> = Vec::with_capacity(rows * blocks);
        if cols > 0 {
            data.spare_capacity_mut()[..rows * cols]
                .par_chunks_mut(cols)
                .zip(scales.spare_capacity_mut()[..rows * blocks].par_chunks_mut(blocks))
                .zip(x.par_chunks(cols))
                .for_each(|((data, scales), x)| {
                    // SAFETY: one row: `cols` bytes and `blocks` scales, both writable.
                    unsafe {
                        quantize_row_raw(
                            isa,
                            x,
                            data.as_mut_ptr().cast(),
                            scales.as_mut_ptr().cast(),
                        )
                    }
                });
        }
        // SAFETY: quantize_row_raw wrote every row's bytes and scales.
        unsafe {
            data.set_len(rows * cols);
            scales.set_len(rows * blocks);
        }
        Q8Rows {
            cols,
            blocks,
            data,
            scales,
        }
    }
}

/// One row of `blocks · 64` values to offset 8-bit blocks and their scales.
fn quantize_row(isa: Isa, x: &[f32], data: &mut [u8], scales: &mut [f32]) {
    assert!(data.len() == x.len() && scales.len() * BLOCK == x.len());
    // SAFETY: the slices are as long as the row needs (checked above).
    unsafe { quantize_row_raw(isa, x, data.as_mut_ptr(), scales.as_mut_ptr()) }
}

/// [`quantize_row`] into memory that need not be initialised.
///
/// # Safety
/// `x.len()` is a multiple of [`BLOCK`]; `data` is valid for writes of `x.len()` bytes and
/// `scales` of `x.len() / BLOCK` values. All of them are written.
unsafe fn quantize_row_raw(isa: Isa, x: &[f32], data: *mut u8, scales: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU has AVX-512 / AVX2 (these ISAs are only chosen when it does); the
        // pointers as the caller promises.
        Isa::Avx512Vnni => return vnni::quantize_row(x, data, scales),
        Isa::AvxVnni => return avx_vnni::quantize_row(x, data, scales),
        Isa::Generic => {}
    }
    let _ = isa;
    let mut q = [0i8; BLOCK];
    for b in 0..x.len() / BLOCK {
        let xs = &x[b * BLOCK..(b + 1) * BLOCK];
        scales
            .add(b)
            .write(quantize_block(xs.iter().copied(), &mut q));
        for (i, &v) in q.iter().enumerate() {
            data.add(b * BLOCK + i).write((v as i16 + 128) as u8);
        }
    }
}

/// Which implementation [`matmul_t`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the reference, and the path on CPUs without VNNI.
    Generic,
    /// AVX2 with the VEX-encoded VNNI (`vpdpbusd` on 256 bits): Intel's client CPUs since Alder
    /// Lake, which have no AVX-512.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Isa {
    /// Every implementation this CPU can run, the fastest last.
    pub fn supported() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avxvnni")
        {
            isas.push(Isa::AvxVnni);
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            isas.push(Isa::Avx512Vnni);
        }
        isas
    }

    /// The fastest of [`supported`](Self::supported), checked once per process; or the one
    /// the environment variable `PEFT_INT8_ISA` names (`generic`, `avxvnni`, `avx512vnni`), if
    /// this CPU supports it: to measure a slower CPU's kernel on a faster one.
    pub fn detect() -> Isa {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let supported = Isa::supported();
            let wanted = std::env::var("PEFT_INT8_ISA").ok();
            wanted
                .and_then(|w| {
                    supported
                        .iter()
                        .copied()
                        .find(|isa| format!("{isa:?}").eq_ignore_ascii_case(&w))
                })
                .unwrap_or(*supported.last().expect("Generic is always supported"))
        })
    }

    /// Whether this CPU multiplies 8-bit blocks faster than f32 (so callers should prefer
    /// the integer path).
    pub fn fast() -> bool {
        Isa::detect() != Isa::Generic
    }
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets (`true`, the default) or stops quantized bases training on the integer GEMM. Off, a
/// quantized base is dequantized to f32 for every product instead: exact NF4/GGUF arithmetic,
/// about a third of the speed of the products. Checked when a layer's products are chosen.
pub fn set_integer_products(enabled: bool) {
    ENABLED.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether quantized bases should train on the integer GEMM: allowed by
/// [`set_integer_products`] and faster than f32 on this CPU.
pub fn integer_products() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed) && Isa::fast()
}

/// `x·Wᵀ` for `x: [m, w.cols()]` row-major: `[m, w.rows()]`, on the fastest implementation.
pub fn matmul_t(x: &[f32], m: usize, w: &Q8Matrix) -> Result<Vec<f32>, Q8Error> {
    matmul_t_with(Isa::detect(), x, m, w)
}

/// Row tiles of this many rows share each loaded weight vector.
const MR: usize = 4;
/// Rows per parallel work item.
const M_CHUNK: usize = 64;

/// [`matmul_t`] on a given implementation (tests compare them).
pub fn matmul_t_with(isa: Isa, x: &[f32], m: usize, w: &Q8Matrix) -> Result<Vec<f32>, Q8Error> {
    check_len("activation", m * w.cols, x.len())?;
    if m == 0 || w.rows == 0 {
        return Ok(vec![0f32; m * w.rows]);
    }
    Ok(product(isa, &Q8Rows::quantize(isa, x, m, w.cols), m, w))
}

/// `x·Wᵀ` for activations already rounded ([`Q8Rows::new`]): one rounding of `x` serves
/// several weight matrices (a vocabulary's chunks, say).
pub fn matmul_t_rows(x: &Q8Rows, w: &Q8Matrix) -> Result<Vec<f32>, Q8Error> {
    check_len("activation columns", w.cols, x.cols)?;
    let m = x.rows();
    if m == 0 || w.rows == 0 {
        return Ok(vec![0f32; m * w.rows]);
    }
    Ok(product(Isa::detect(), x, m, w))
}

fn product(isa: Isa, xq: &Q8Rows, m: usize, w: &Q8Matrix) -> Vec<f32> {
    let n = w.rows;
    // Not zeroed: every element is stored below, and zeroing a fresh output of a few MB per
    // product (calloc re-using freed memory clears it) showed as `memset` in the step.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = SendPtr(y.as_mut_ptr());
    // Work items: (column panel of up to NR tiles) × (chunk of rows); each writes its own
    // rectangle of y.
    let panels = w.tiles.div_ceil(NR);
    let chunks = m.div_ceil(M_CHUNK);
    (0..panels * chunks).into_par_iter().for_each(|item| {
        let (p, c) = (item / chunks, item % chunks);
        let rows = c * M_CHUNK..((c + 1) * M_CHUNK).min(m);
        let tiles = p * NR..((p + 1) * NR).min(w.tiles);
        let out = &out;
        // SAFETY: each work item writes only y[rows, columns of `tiles`] (within the
        // capacity), disjoint from every other item's, and y outlives the parallel loop.
        unsafe { panel(isa, xq, w, rows, tiles, out.0, n) }
    });
    // SAFETY: the work items cover every row chunk times every column panel, and each panel
    // stores every row of its chunk and every column below n of its tiles (all three
    // implementations), so all m·n elements are initialized.
    unsafe { y.set_len(m * n) };
    y
}

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Tiles per column panel.
const NR: usize = 3;

/// # Safety
/// `y` is `[.., n]` row-major and covers `rows`; only the columns of `tiles` are written.
unsafe fn panel(
    isa: Isa,
    x: &Q8Rows,
    w: &Q8Matrix,
    rows: std::ops::Range<usize>,
    tiles: std::ops::Range<usize>,
    y: *mut f32,
    n: usize,
) {
    match isa {
        Isa::Generic => panel_generic(x, w, rows, tiles, y, n),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => avx_vnni::panel(x, w, rows, tiles, y, n),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => vnni::panel(x, w, rows, tiles, y, n),
    }
}

/// # Safety
/// As [`panel`].
unsafe fn panel_generic(
    x: &Q8Rows,
    w: &Q8Matrix,
    rows: std::ops::Range<usize>,
    tiles: std::ops::Range<usize>,
    y: *mut f32,
    n: usize,
) {
    for r in rows {
        for t in tiles.clone() {
            for lane in 0..LANES {
                let col = t * LANES + lane;
                if col >= n {
                    break;
                }
                let mut acc = 0f32;
                for b in 0..x.blocks {
                    let xs = &x.data[r * x.cols + b * BLOCK..][..BLOCK];
                    let wb = &w.data[(t * w.blocks + b) * TILE_BLOCK..][..TILE_BLOCK];
                    let mut sum = 0i32;
                    for (i, &u) in xs.iter().enumerate() {
                        sum += u as i32 * wb[(i / 4) * (LANES * 4) + lane * 4 + i % 4] as i32;
                    }
                    let at = (t * w.blocks + b) * LANES + lane;
                    let scale = x.scales[r * x.blocks + b] * w.scales[at];
                    acc += (sum - w.offsets[at]) as f32 * scale;
                }
                *y.add(r * n + col) = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// As [`super::panel`]; the CPU has AVX512F, AVX512BW and AVX512-VNNI.
    pub(super) unsafe fn panel(
        x: &Q8Rows,
        w: &Q8Matrix,
        rows: std::ops::Range<usize>,
        tiles: std::ops::Range<usize>,
        y: *mut f32,
        n: usize,
    ) {
        let t0 = tiles.start;
        let mut r = rows.start;
        while r < rows.end {
            let left = rows.end - r;
            match (left.min(MR), tiles.len()) {
                (4, 3) => tile::<4, 3>(x, w, r, t0, y, n),
                (4, 2) => tile::<4, 2>(x, w, r, t0, y, n),
                (4, _) => tile::<4, 1>(x, w, r, t0, y, n),
                (3, 3) => tile::<3, 3>(x, w, r, t0, y, n),
                (3, 2) => tile::<3, 2>(x, w, r, t0, y, n),
                (3, _) => tile::<3, 1>(x, w, r, t0, y, n),
                (2, 3) => tile::<2, 3>(x, w, r, t0, y, n),
                (2, 2) => tile::<2, 2>(x, w, r, t0, y, n),
                (2, _) => tile::<2, 1>(x, w, r, t0, y, n),
                (_, 3) => tile::<1, 3>(x, w, r, t0, y, n),
                (_, 2) => tile::<1, 2>(x, w, r, t0, y, n),
                (_, _) => tile::<1, 1>(x, w, r, t0, y, n),
            }
            r += left.min(MR);
        }
    }

    /// One row of activations to offset 8-bit blocks, exactly as [`Q8Rows::quantize`]'s
    /// scalar loop does it (the same multiply, rounding half to even).
    ///
    /// # Safety
    /// As [`super::quantize_row_raw`]; the CPU has AVX512F and AVX512BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_row(x: &[f32], data: *mut u8, scales: *mut f32) {
        let offset = _mm512_set1_epi32(128);
        for b in 0..x.len() / BLOCK {
            let xs = x.as_ptr().add(b * BLOCK);
            let v: [__m512; 4] = std::array::from_fn(|i| _mm512_loadu_ps(xs.add(16 * i)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])),
                _mm512_max_ps(_mm512_abs_ps(v[2]), _mm512_abs_ps(v[3])),
            ));
            let out = data.add(b * BLOCK);
            if amax == 0.0 || !amax.is_finite() {
                std::ptr::write_bytes(out, 128, BLOCK);
                scales
                    .add(b)
                    .write(if amax.is_finite() { 0.0 } else { f32::NAN });
                continue;
            }
            scales.add(b).write(amax / 127.0);
            let inv = _mm512_set1_ps(127.0 / amax);
            for (i, v) in v.iter().enumerate() {
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(*v, inv));
                let q = _mm512_min_epi32(
                    _mm512_max_epi32(q, _mm512_set1_epi32(-127)),
                    _mm512_set1_epi32(127),
                );
                _mm_storeu_si128(
                    out.add(16 * i) as *mut _,
                    _mm512_cvtepi32_epi8(_mm512_add_epi32(q, offset)),
                );
            }
        }
    }

    /// `y[r0..r0+R, tiles t0..t0+T] = x·Wᵀ` over the whole reduction.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize, const T: usize>(
        x: &Q8Rows,
        w: &Q8Matrix,
        r0: usize,
        t0: usize,
        y: *mut f32,
        n: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let xd = x.data.as_ptr();
        let wd = w.data.as_ptr();
        for b in 0..x.blocks {
            let mut sums = [[_mm512_setzero_si512(); T]; R];
            let wb: [*const i8; T] =
                std::array::from_fn(|j| wd.add(((t0 + j) * w.blocks + b) * TILE_BLOCK));
            let xb: [*const u8; R] = std::array::from_fn(|i| xd.add((r0 + i) * x.cols + b * BLOCK));
            for g in 0..BLOCK / 4 {
                let wv: [__m512i; T] =
                    std::array::from_fn(|j| _mm512_loadu_si512(wb[j].add(g * 64) as *const _));
                for i in 0..R {
                    let xv = _mm512_set1_epi32((xb[i].add(g * 4) as *const i32).read_unaligned());
                    for j in 0..T {
                        sums[i][j] = _mm512_dpbusd_epi32(sums[i][j], xv, wv[j]);
                    }
                }
            }
            for j in 0..T {
                let at = ((t0 + j) * w.blocks + b) * LANES;
                let off = _mm512_loadu_si512(w.offsets.as_ptr().add(at) as *const _);
                let sw = _mm512_loadu_ps(w.scales.as_ptr().add(at));
                for i in 0..R {
                    let sx = _mm512_set1_ps(*x.scales.get_unchecked((r0 + i) * x.blocks + b));
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[i][j], off));
                    acc[i][j] = _mm512_fmadd_ps(v, _mm512_mul_ps(sw, sx), acc[i][j]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let col = (t0 + j) * LANES;
                let valid = n.saturating_sub(col).min(LANES);
                let mask: __mmask16 = if valid == LANES {
                    !0
                } else {
                    (1u16 << valid) - 1
                };
                _mm512_mask_storeu_ps(y.add((r0 + i) * n + col), mask, v);
            }
        }
    }
}

/// The 256-bit kernels: a 16-lane tile is two vectors of 8; with 16 vector registers the
/// register tile is 3 rows × 16 columns (accumulators, block sums, two weight vectors and a
/// broadcast activation: 15 registers).
#[cfg(target_arch = "x86_64")]
mod avx_vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// Rows per register tile.
    const R_MAX: usize = 3;

    /// # Safety
    /// As [`super::panel`]; the CPU has AVX2, FMA and AVX-VNNI.
    pub(super) unsafe fn panel(
        x: &Q8Rows,
        w: &Q8Matrix,
        rows: std::ops::Range<usize>,
        tiles: std::ops::Range<usize>,
        y: *mut f32,
        n: usize,
    ) {
        for t in tiles {
            let mut r = rows.start;
            while r < rows.end {
                match (rows.end - r).min(R_MAX) {
                    3 => tile::<3>(x, w, r, t, y, n),
                    2 => tile::<2>(x, w, r, t, y, n),
                    _ => tile::<1>(x, w, r, t, y, n),
                }
                r += (rows.end - r).min(R_MAX);
            }
        }
    }

    /// One row of activations to offset 8-bit blocks, exactly as the scalar loop does it (the
    /// same multiply, rounding half to even).
    ///
    /// # Safety
    /// As [`super::quantize_row_raw`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_row(x: &[f32], data: *mut u8, scales: *mut f32) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let (lo, hi, offset) = (
            _mm256_set1_epi32(-127),
            _mm256_set1_epi32(127),
            _mm256_set1_epi32(128),
        );
        // packus interleaves 128-bit lanes: this gathers the 4-byte groups back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..x.len() / BLOCK {
            let xs = x.as_ptr().add(b * BLOCK);
            let v: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(xs.add(8 * i)));
            let mut m = _mm256_and_ps(v[0], abs_mask);
            for vi in &v[1..] {
                m = _mm256_max_ps(m, _mm256_and_ps(*vi, abs_mask));
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            let out = data.add(b * BLOCK);
            if amax == 0.0 || !amax.is_finite() {
                std::ptr::write_bytes(out, 128, BLOCK);
                scales
                    .add(b)
                    .write(if amax.is_finite() { 0.0 } else { f32::NAN });
                continue;
            }
            scales.add(b).write(amax / 127.0);
            let inv = _mm256_set1_ps(127.0 / amax);
            let q: [__m256i; 8] = std::array::from_fn(|i| {
                let q = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
                _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(q, lo), hi), offset)
            });
            for half in 0..2 {
                let q = &q[4 * half..];
                let words = _mm256_packus_epi16(
                    _mm256_packus_epi32(q[0], q[1]),
                    _mm256_packus_epi32(q[2], q[3]),
                );
                let bytes = _mm256_permutevar8x32_epi32(words, order);
                _mm256_storeu_si256(out.add(32 * half) as *mut _, bytes);
            }
        }
    }

    /// `y[r0..r0+R, tile t] = x·Wᵀ` over the whole reduction.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    unsafe fn tile<const R: usize>(
        x: &Q8Rows,
        w: &Q8Matrix,
        r0: usize,
        t: usize,
        y: *mut f32,
        n: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let (xd, wd) = (x.data.as_ptr(), w.data.as_ptr());
        for b in 0..x.blocks {
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            let wb = wd.add((t * w.blocks + b) * TILE_BLOCK);
            let xb: [*const u8; R] = std::array::from_fn(|i| xd.add((r0 + i) * x.cols + b * BLOCK));
            for g in 0..BLOCK / 4 {
                let w0 = _mm256_loadu_si256(wb.add(g * 64) as *const _);
                let w1 = _mm256_loadu_si256(wb.add(g * 64 + 32) as *const _);
                for i in 0..R {
                    let xv = _mm256_set1_epi32((xb[i].add(g * 4) as *const i32).read_unaligned());
                    sums[i][0] = _mm256_dpbusd_avx_epi32(sums[i][0], xv, w0);
                    sums[i][1] = _mm256_dpbusd_avx_epi32(sums[i][1], xv, w1);
                }
            }
            let at = (t * w.blocks + b) * LANES;
            for h in 0..2 {
                let off = _mm256_loadu_si256(w.offsets.as_ptr().add(at + 8 * h) as *const _);
                let sw = _mm256_loadu_ps(w.scales.as_ptr().add(at + 8 * h));
                for i in 0..R {
                    let sx = _mm256_set1_ps(*x.scales.get_unchecked((r0 + i) * x.blocks + b));
                    let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[i][h], off));
                    acc[i][h] = _mm256_fmadd_ps(v, _mm256_mul_ps(sw, sx), acc[i][h]);
                }
            }
        }
        let col = t * LANES;
        let valid = n.saturating_sub(col).min(LANES);
        for (i, row) in acc.iter().enumerate() {
            let out = y.add((r0 + i) * n + col);
            if valid == LANES {
                _mm256_storeu_ps(out, row[0]);
                _mm256_storeu_ps(out.add(8), row[1]);
            } else {
                let mut lanes = [0f32; LANES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), row[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), row[1]);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), out, valid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pseudo_random;

    /// f64 product of `x` and the dequantized activations/weights: what the kernels compute.
    fn reference(x: &[f32], m: usize, w: &Q8Matrix) -> Vec<f64> {
        let (k, n) = (w.cols(), w.rows());
        let xq = Q8Rows::quantize(Isa::Generic, x, m, k);
        let wd = w.dequantize();
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut s = 0f64;
                for i in 0..k {
                    let xv = (xq.data[r * k + i] as f64 - 128.0)
                        * xq.scales[r * xq.blocks + i / BLOCK] as f64;
                    s += xv * wd[c * k + i] as f64;
                }
                y[r * n + c] = s;
            }
        }
        y
    }

    #[test]
    fn every_implementation_computes_the_product_of_the_rounded_operands() {
        // Odd shapes: rows that do not fill a tile, row counts that leave remainders of 1-3.
        for &(m, n, k) in &[
            (7usize, 37usize, 128usize),
            (70, 50, 192),
            (1, 16, 64),
            (5, 200, 64),
        ] {
            let x = pseudo_random(m * k, 1);
            let mut wv = pseudo_random(n * k, 2);
            wv[..BLOCK].fill(0.0); // an all-zero block
            let w = Q8Matrix::quantize(&wv, n, k).unwrap();
            let want = reference(&x, m, &w);
            for isa in Isa::supported() {
                let got = matmul_t_with(isa, &x, m, &w).unwrap();
                for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{isa:?} {m}x{n}x{k} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// `got: [m, n]` against the exact `Σ_i x[r, i]·w(c, i)` within the bound of rounding each
    /// operand by at most half a step (amax/254 of its block) per element.
    fn assert_within_the_8_bit_bound(
        x: &[f32],
        (m, n, k): (usize, usize, usize),
        w: impl Fn(usize, usize) -> f32,
        got: &[f32],
    ) {
        for r in 0..m {
            for c in 0..n {
                let (mut exact, mut bound) = (0f64, 0f64);
                for i in 0..k {
                    let (xv, wv) = (x[r * k + i] as f64, w(c, i) as f64);
                    exact += xv * wv;
                    bound += (xv.abs() + wv.abs()) / 254.0 + 1.0 / 254.0f64.powi(2);
                }
                let g = got[r * n + c] as f64;
                assert!(
                    (g - exact).abs() <= bound,
                    "({r}, {c}): {g} vs {exact}, bound {bound}"
                );
            }
        }
    }

    #[test]
    fn the_rounding_error_stays_within_the_8_bit_bound() {
        let (m, n, k) = (9, 33, 256);
        let x = pseudo_random(m * k, 3);
        let wv = pseudo_random(n * k, 4);
        let w = Q8Matrix::quantize(&wv, n, k).unwrap();
        let got = matmul_t(&x, m, &w).unwrap();
        assert_within_the_8_bit_bound(&x, (m, n, k), |c, i| wv[c * k + i], &got);
    }

    #[test]
    fn the_transposed_matrix_gives_the_input_gradient() {
        let (m, n, k) = (6, 64, 128);
        let dy = pseudo_random(m * n, 5);
        let wv = pseudo_random(n * k, 6);
        let wt = Q8Matrix::quantize_transposed(&wv, n, k).unwrap();
        assert_eq!((wt.rows(), wt.cols()), (k, n));
        let dx = matmul_t(&dy, m, &wt).unwrap();
        // dx[r, c] = Σ_j dy[r, j]·W[j, c].
        assert_within_the_8_bit_bound(&dy, (m, k, n), |c, j| wv[j * k + c], &dx);
    }

    #[test]
    fn every_implementation_rounds_the_activations_alike() {
        let (m, k) = (5, 320);
        let mut x = pseudo_random(m * k, 7);
        x[64..128].fill(0.0);
        x[130] = 2.5 * (x[128..192].iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0); // at or next to a tie
        let want = Q8Rows::quantize(Isa::Generic, &x, m, k);
        for isa in Isa::supported() {
            let got = Q8Rows::quantize(isa, &x, m, k);
            assert_eq!(got.data, want.data, "{isa:?}");
            assert_eq!(got.scales, want.scales, "{isa:?}");
        }
    }

    #[test]
    fn rows_round_trip_within_half_a_step() {
        let (m, k) = (3, 4160); // more than one parallel chunk of blocks
        let mut x = pseudo_random(m * k, 8);
        x[100] = 40.0; // one large value: its block's step is large, the others' are not
        let q = Q8Rows::new(&x, m, k).unwrap();
        let back = q.to_f32();
        for (b, (xs, ys)) in x.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (x, y) in xs.iter().zip(ys) {
                assert!(
                    (x - y).abs() <= amax / 254.0 * 1.0001,
                    "block {b}: {x} vs {y}"
                );
            }
        }
        assert_eq!(q.size_in_bytes(), m * k + 4 * m * k / BLOCK);
        assert_eq!(Q8Rows::new(&x[..96], 1, 96).err(), Some(Q8Error::Cols(96)));
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert_eq!(
            Q8Matrix::quantize(&[0.0; 96], 2, 48).err(),
            Some(Q8Error::Cols(48))
        );
        assert!(matches!(
            Q8Matrix::quantize(&[0.0; 10], 2, 64),
            Err(Q8Error::Len { .. })
        ));
        let w = Q8Matrix::quantize(&[0.5; 128], 2, 64).unwrap();
        assert!(matches!(
            matmul_t(&[0.0; 65], 1, &w),
            Err(Q8Error::Len { .. })
        ));
    }
}
