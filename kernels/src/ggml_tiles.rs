//! GGML Q4_0, Q4_1, Q5_0 and Q8_0 weights regrouped at load for decoding with AVX-512 VNNI: the
//! blocks of 16 consecutive rows side by side, so one 512-bit `vpdpbusd` multiplies four
//! weights of each of the 16 rows by the same four (broadcast) activations, and its 16
//! 32-bit lanes are 16 output rows' partial sums.
//!
//! [`crate::ggml_matvec`] reads GGML's own layout, one row at a time: every 32-weight block
//! costs a 256-bit unpack, a dot product, its own scale conversion and a multiply-add into a
//! vector that is summed across lanes at the end of the row, about ten instructions per 32
//! multiply-adds. Here a tile (16 rows × 32 columns) costs about thirty for 512: the scales of
//! the 16 rows convert in one instruction, and no lane is ever summed across. llama.cpp's CPU
//! backend repacks its Q4_0 weights for the same reason (the idea carries over, the code is
//! ours).
//!
//! A tile of Q4_0/Q4_1 is four 64-byte lines of codes and the 16 rows' `d` (f16) and, for Q4_1,
//! their `m` (a fifth line). Code line `c`'s 32-bit lane `r` is bytes `4c..4c+4` of row `r`'s
//! block, unchanged: their low nibbles are elements `4c..4c+4` and their high nibbles elements
//! `16+4c..20+4c`. Q8_0's tile is eight code lines (lane `r` of line `c`: row `r`'s elements
//! `4c..4c+4`, stored `+128` so they are the unsigned operand `vpdpbusd` wants; the kernel takes
//! `128·Σx` back off exactly, in integers). Q8_0's 16 `d` fill half a line, so two neighbouring
//! tiles share one: their sixteen code lines, then a line with the first tile's `d` in bytes 0..32
//! and the second's in 32..64 (as many bytes per weight as the file; with a line of `d` per tile,
//! Q8_0 read 6% more per token and decoded 15% slower). Q5_0's tile is Q4_0's four code lines (the
//! low four bits) and a fifth line of the fifth bits, two tiles again sharing a line of `d`: byte
//! `4r+t` of the fifth line has, in bit `c`, the fifth bit of code line `c`'s low-nibble element
//! `t` of row `r` (element `4c+t`) and, in bit `4+c`, that of its high-nibble element (`16+4c+t`),
//! so one shift and mask per code line puts each element's fifth bit in place (llama.cpp's Q4_K_M
//! files keep most of a small model's layers in Q5_0 where rows are not a multiple of 256). Tiles
//! of one row group follow each other along the row, then the next group. Rows past the weight's
//! last (a partial last group) are zero and their outputs dropped. Regrouping is a permutation of
//! bytes: [`TiledBlocks::to_blocks`] gives the file's bytes back exactly.

use half::f16;

use crate::ggml_matvec::{BlockFormat, Isa, Q8Rows};

/// Rows per tile.
pub const TILE_ROWS: usize = 16;
const LINE: usize = 64;

/// One 64-byte line, aligned so a tile's loads never straddle two cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; LINE]);

/// A `[rows, cols]` weight of GGML blocks in the tiled layout of the module's description.
pub struct TiledBlocks {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for TiledBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TiledBlocks")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Code lines per tile (Q5_0's fifth is its line of fifth bits).
const fn code_lines(format: BlockFormat) -> usize {
    match format {
        BlockFormat::Q8_0 => 8,
        BlockFormat::Q5_0 => 5,
        _ => 4,
    }
}

/// Tiles that share one scale line (a unit: their code lines, then the scale line): two for
/// Q8_0 and Q5_0, whose 16 `d` fill half a line. Q4_0's `d` would pair up the same way (7%
/// fewer bytes), but decoded no faster on the Zen 4 (noisy: 181-222 against 201-233
/// tokens/s), so it keeps a line per tile like Q4_1 (`d` and `m`).
const fn tiles_per_scale_line(format: BlockFormat) -> usize {
    match format {
        BlockFormat::Q8_0 | BlockFormat::Q5_0 => 2,
        _ => 1,
    }
}

/// Byte `t` (of 4) of a row's Q5_0 fifth-bit lane, from the block's 32 fifth bits `qh`.
fn fifth_bits_byte(qh: u32, t: usize) -> u8 {
    (0..4).fold(0u8, |byte, c| {
        let low = (qh >> (4 * c + t)) & 1;
        let high = (qh >> (16 + 4 * c + t)) & 1;
        byte | (low as u8) << c | (high as u8) << (4 + c)
    })
}

/// The fifth bit (0 or 16) of element `e` of a row whose fifth-bit lane bytes are `lane`.
fn fifth_bit(lane: &[u8], e: usize) -> u8 {
    let (half, within) = (e / 16, e % 16);
    let (c, t) = (within / 4, within % 4);
    ((lane[t] >> (4 * half + c)) & 1) << 4
}

/// Lines of one row group of `nb` tiles (a partial last unit is padded).
const fn group_lines(format: BlockFormat, nb: usize) -> usize {
    let per_unit = tiles_per_scale_line(format);
    nb.div_ceil(per_unit) * (per_unit * code_lines(format) + 1)
}

/// Where tile `b` of a row group is, in lines from the group's start.
#[derive(Clone, Copy)]
struct Place {
    /// Its first code line.
    codes: usize,
    /// The line holding its `d` (and Q4_1's `m` at byte 32).
    scales: usize,
    /// The byte of that line where its 16 `d` start.
    d_at: usize,
}

#[inline(always)]
const fn place(format: BlockFormat, b: usize) -> Place {
    let per_unit = tiles_per_scale_line(format);
    let codes = code_lines(format);
    let (unit, within) = (b / per_unit, b % per_unit);
    let start = unit * (per_unit * codes + 1);
    Place {
        codes: start + within * codes,
        scales: start + per_unit * codes,
        d_at: 32 * within,
    }
}

impl TiledBlocks {
    /// Whether `format` has a tiled form.
    pub fn supports(format: BlockFormat) -> bool {
        matches!(
            format,
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 | BlockFormat::Q8_0
        )
    }

    /// Whether decoding on this CPU (within `PEFT_DECODE_ISA`) runs faster tiled: it has
    /// AVX-512 VNNI or AVX2, which the tiled kernels are written for.
    pub fn preferred() -> bool {
        !matches!(Isa::detect(), Isa::Generic)
    }

    /// Regroups `[rows, cols]` GGML blocks (`rows · cols / 32` blocks of `format`, row-major).
    pub fn from_blocks(
        format: BlockFormat,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, String> {
        if !Self::supports(format) {
            return Err(format!("{format:?} has no tiled layout"));
        }
        if !cols.is_multiple_of(BlockFormat::BLOCK) {
            return Err(format!(
                "{cols} columns are not a whole number of 32-element blocks"
            ));
        }
        let nb = cols / BlockFormat::BLOCK;
        let bb = format.block_bytes();
        if bytes.len() != rows * nb * bb {
            return Err(format!(
                "{} bytes for a [{rows}, {cols}] {format:?} weight (expected {})",
                bytes.len(),
                rows * nb * bb
            ));
        }
        let groups = rows.div_ceil(TILE_ROWS);
        let per_group = group_lines(format, nb);
        let mut lines = vec![Line([0; LINE]); groups * per_group];
        // Row groups in parallel (a 7B model's file is gigabytes).
        use rayon::prelude::*;
        lines
            .par_chunks_mut(per_group)
            .enumerate()
            .for_each(|(g, group)| {
                for b in 0..nb {
                    Self::fill_tile(format, bytes, nb, rows, g, b, group);
                }
            });
        Ok(TiledBlocks {
            format,
            rows,
            cols,
            lines,
        })
    }

    /// Tile `b` of row group `g` (whose lines are `group`) from the GGML blocks `bytes` (`nb`
    /// blocks per row).
    fn fill_tile(
        format: BlockFormat,
        bytes: &[u8],
        nb: usize,
        rows: usize,
        g: usize,
        b: usize,
        group: &mut [Line],
    ) {
        let bb = format.block_bytes();
        let at = place(format, b);
        for r in 0..TILE_ROWS.min(rows - g * TILE_ROWS) {
            let row = g * TILE_ROWS + r;
            let blk = &bytes[(row * nb + b) * bb..][..bb];
            let scales = &mut group[at.scales].0;
            scales[at.d_at + 2 * r..at.d_at + 2 * r + 2].copy_from_slice(&blk[0..2]);
            if format == BlockFormat::Q4_1 {
                scales[32 + 2 * r..34 + 2 * r].copy_from_slice(&blk[2..4]);
            }
            let codes = &mut group[at.codes..at.codes + code_lines(format)];
            match format {
                BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 => {
                    let qs = &blk[bb - 16..];
                    for (c, line) in codes.iter_mut().take(4).enumerate() {
                        line.0[4 * r..4 * r + 4].copy_from_slice(&qs[4 * c..4 * c + 4]);
                    }
                    if format == BlockFormat::Q5_0 {
                        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                        for t in 0..4 {
                            codes[4].0[4 * r + t] = fifth_bits_byte(qh, t);
                        }
                    }
                }
                BlockFormat::Q8_0 => {
                    let qs = &blk[2..];
                    for (c, line) in codes.iter_mut().enumerate() {
                        for j in 0..4 {
                            line.0[4 * r + j] = qs[4 * c + j] ^ 0x80;
                        }
                    }
                }
            }
        }
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held (the file's size plus the padding of a partial last group, and of a
    /// partial last Q8_0 unit).
    pub fn size_in_bytes(&self) -> usize {
        self.lines.len() * LINE
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BlockFormat::BLOCK
    }

    /// The lines of row group `g`.
    fn group(&self, g: usize) -> &[Line] {
        let per_group = group_lines(self.format, self.blocks_per_row());
        &self.lines[g * per_group..][..per_group]
    }

    /// Row `row`'s block `b` in GGML's layout, written into `out` (`block_bytes` long).
    fn block_into(&self, row: usize, b: usize, out: &mut [u8]) {
        let (g, r) = (row / TILE_ROWS, row % TILE_ROWS);
        let group = self.group(g);
        let at = place(self.format, b);
        let scales = &group[at.scales].0;
        let codes = &group[at.codes..at.codes + code_lines(self.format)];
        let bb = self.format.block_bytes();
        out[0..2].copy_from_slice(&scales[at.d_at + 2 * r..at.d_at + 2 * r + 2]);
        match self.format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 => {
                if self.format == BlockFormat::Q4_1 {
                    out[2..4].copy_from_slice(&scales[32 + 2 * r..34 + 2 * r]);
                }
                let qs = &mut out[bb - 16..bb];
                for (c, line) in codes.iter().take(4).enumerate() {
                    qs[4 * c..4 * c + 4].copy_from_slice(&line.0[4 * r..4 * r + 4]);
                }
                if self.format == BlockFormat::Q5_0 {
                    let lane = &codes[4].0[4 * r..4 * r + 4];
                    let qh =
                        (0..32).fold(0u32, |qh, e| qh | ((fifth_bit(lane, e) >> 4) as u32) << e);
                    out[2..6].copy_from_slice(&qh.to_le_bytes());
                }
            }
            BlockFormat::Q8_0 => {
                for (c, line) in codes.iter().enumerate() {
                    for j in 0..4 {
                        out[2 + 4 * c + j] = line.0[4 * r + j] ^ 0x80;
                    }
                }
            }
        }
    }

    /// The weight in GGML's own layout, byte for byte as it was given to
    /// [`from_blocks`](Self::from_blocks) (for saving, and for candle's kernels).
    pub fn to_blocks(&self) -> Vec<u8> {
        let (nb, bb) = (self.blocks_per_row(), self.format.block_bytes());
        let mut out = vec![0u8; self.rows * nb * bb];
        for (i, blk) in out.chunks_exact_mut(bb).enumerate() {
            self.block_into(i / nb, i % nb, blk);
        }
        out
    }

    /// The weight as f32 `[rows, cols]`, row-major, rows in parallel (training batches and
    /// prefill multiply by it with the f32 GEMM).
    pub fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let (nb, cols) = (self.blocks_per_row(), self.cols);
        let mut out = vec![0f32; self.rows * cols];
        out.par_chunks_mut(cols * TILE_ROWS)
            .enumerate()
            .for_each(|(g, group)| {
                let lines = self.group(g);
                for b in 0..nb {
                    let at = place(self.format, b);
                    let scales = &lines[at.scales].0;
                    let codes = &lines[at.codes..at.codes + code_lines(self.format)];
                    let f16_at =
                        |at: usize| f16::from_le_bytes([scales[at], scales[at + 1]]).to_f32();
                    for (r, row) in group.chunks_exact_mut(cols).enumerate() {
                        let d = f16_at(at.d_at + 2 * r);
                        let dst = &mut row[b * 32..b * 32 + 32];
                        match self.format {
                            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 => {
                                let offset = match self.format {
                                    BlockFormat::Q4_1 => f16_at(32 + 2 * r),
                                    _ => -self.format.zero_code() * d,
                                };
                                let fifth = |e: usize| match self.format {
                                    BlockFormat::Q5_0 => fifth_bit(&codes[4].0[4 * r..], e),
                                    _ => 0,
                                };
                                for (c, line) in codes.iter().take(4).enumerate() {
                                    for j in 0..4 {
                                        let q = line.0[4 * r + j];
                                        let (lo, hi) = (4 * c + j, 16 + 4 * c + j);
                                        dst[lo] = ((q & 0x0F) | fifth(lo)) as f32 * d + offset;
                                        dst[hi] = ((q >> 4) | fifth(hi)) as f32 * d + offset;
                                    }
                                }
                            }
                            BlockFormat::Q8_0 => {
                                for (c, line) in codes.iter().enumerate() {
                                    for j in 0..4 {
                                        let q = (line.0[4 * r + j] ^ 0x80) as i8;
                                        dst[4 * c + j] = q as f32 * d;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        out
    }

    /// `y = x · Wᵀ` for `x: [m, cols]` row-major (decoding: a few rows), `y: [m, rows]`; the
    /// activations rounded to 8 bits per 32 as [`crate::ggml_matvec::matmul_t`] rounds them,
    /// and the same sums to the last rounding of the accumulation order.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Result<Vec<f32>, String> {
        if x.len() != m * self.cols {
            return Err(format!(
                "{} inputs for {m} rows of {} features",
                x.len(),
                self.cols
            ));
        }
        let xq = Q8Rows::quantize(x, self.cols);
        let isa = Isa::detect();
        Ok(crate::ggml_matvec::rows_times_in(
            m,
            self.rows,
            TILE_ROWS,
            |first, out| {
                self.groups_into(first / TILE_ROWS, &xq, m, out, isa);
            },
        ))
    }

    /// [`matmul_t`](Self::matmul_t) for several weights that read the same input (a layer's
    /// q, k and v, or gate and up): the input is rounded once and all the weights' row
    /// groups are split over the threads in one parallel call, not one call each (decoding
    /// pays the hand-off to the other threads per call). Returns each weight's `y: [m, rows]`.
    pub fn matmul_t_many(
        weights: &[&TiledBlocks],
        x: &[f32],
        m: usize,
    ) -> Result<Vec<Vec<f32>>, String> {
        let Some(first) = weights.first() else {
            return Ok(Vec::new());
        };
        let cols = first.cols;
        if let Some(w) = weights.iter().find(|w| w.cols != cols) {
            return Err(format!(
                "weights of {} and {} input features cannot share an input",
                cols, w.cols
            ));
        }
        if x.len() != m * cols {
            return Err(format!(
                "{} inputs for {m} rows of {cols} features",
                x.len()
            ));
        }
        let xq = Q8Rows::quantize(x, cols);
        let isa = Isa::detect();
        // Weight i's groups are global groups starts[i]..starts[i + 1].
        let mut starts = vec![0usize];
        for w in weights {
            starts.push(starts.last().expect("non-empty") + w.rows.div_ceil(TILE_ROWS));
        }
        let total = *starts.last().expect("non-empty");
        let y = crate::ggml_matvec::rows_times_in(m, total * TILE_ROWS, TILE_ROWS, |first, out| {
            let (mut g, end) = (
                first / TILE_ROWS,
                first / TILE_ROWS + out.len() / (TILE_ROWS * m),
            );
            let mut out = out;
            while g < end {
                let i = starts.partition_point(|&s| s <= g) - 1;
                let here = end.min(starts[i + 1]) - g;
                let (mine, rest) = std::mem::take(&mut out).split_at_mut(here * TILE_ROWS * m);
                weights[i].groups_into(g - starts[i], &xq, m, mine, isa);
                out = rest;
                g += here;
            }
        });
        let width = total * TILE_ROWS;
        Ok(weights
            .iter()
            .zip(&starts)
            .map(|(w, &s)| {
                (0..m)
                    .flat_map(|r| &y[r * width + s * TILE_ROWS..][..w.rows])
                    .copied()
                    .collect()
            })
            .collect())
    }

    /// Row groups `g0..` (as many as `out: [16·groups, m]` holds) times every input row.
    fn groups_into(&self, g0: usize, xq: &Q8Rows, m: usize, out: &mut [f32], isa: Isa) {
        let nb = self.blocks_per_row();
        for (i, slot) in out.chunks_mut(TILE_ROWS * m).enumerate() {
            let tiles = self.group(g0 + i);
            let mut r = 0;
            while r < m {
                let count = (m - r).min(4);
                let mut y = [[0f32; TILE_ROWS]; 4];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Isa::supported` found the features; `tiles` holds `nb` tiles.
                    Isa::Vnni => unsafe {
                        x86::group_vnni(self.format, tiles, nb, xq, r, count, &mut y)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Isa::Avx2 => unsafe {
                        x86::group_avx2(self.format, tiles, nb, xq, r, count, &mut y)
                    },
                    Isa::Generic => group_generic(self.format, tiles, nb, xq, r, count, &mut y),
                }
                for (j, ys) in y.iter().enumerate().take(count) {
                    for (o, &v) in ys.iter().enumerate() {
                        if let Some(dst) = slot.get_mut(o * m + r + j) {
                            *dst = v;
                        }
                    }
                }
                r += count;
            }
        }
    }
}

/// The reference for one row group: the same integer sums and the same f32 operations in
/// the same order as the vector kernel, lane by lane.
fn group_generic(
    format: BlockFormat,
    tiles: &[Line],
    nb: usize,
    xq: &Q8Rows,
    r0: usize,
    count: usize,
    y: &mut [[f32; TILE_ROWS]; 4],
) {
    for (j, yj) in y.iter_mut().enumerate().take(count) {
        let (x, dx, sx) = xq.row(r0 + j);
        let q_sum = xq.q_sums(r0 + j);
        for b in 0..nb {
            let at = place(format, b);
            let scales = &tiles[at.scales].0;
            let codes = &tiles[at.codes..at.codes + code_lines(format)];
            let xs = &x[b * 32..b * 32 + 32];
            for (r, acc) in yj.iter_mut().enumerate() {
                let f16_at = |at: usize| f16::from_le_bytes([scales[at], scales[at + 1]]);
                let d = f16_at(at.d_at + 2 * r).to_f32();
                let mut s = 0i32;
                let fifth = |e: usize| match format {
                    BlockFormat::Q5_0 => fifth_bit(&codes[4].0[4 * r..], e),
                    _ => 0,
                };
                for (c, line) in codes.iter().enumerate() {
                    for t in 0..4 {
                        let q = line.0[4 * r + t];
                        match format {
                            BlockFormat::Q8_0 => s += q as i32 * xs[4 * c + t] as i32,
                            // Q5_0's fifth line only feeds `fifth`.
                            BlockFormat::Q5_0 if c == 4 => {}
                            _ => {
                                let (lo, hi) = (4 * c + t, 16 + 4 * c + t);
                                s += ((q & 0x0F) | fifth(lo)) as i32 * xs[lo] as i32;
                                s += ((q >> 4) | fifth(hi)) as i32 * xs[hi] as i32;
                            }
                        }
                    }
                }
                if format == BlockFormat::Q8_0 {
                    s -= 128 * q_sum[b];
                }
                *acc = (s as f32).mul_add(d * dx[b], *acc);
                match format {
                    BlockFormat::Q4_0 | BlockFormat::Q5_0 => {
                        *acc = d.mul_add(-format.zero_code() * sx[b], *acc)
                    }
                    BlockFormat::Q4_1 => *acc = f16_at(32 + 2 * r).to_f32().mul_add(sx[b], *acc),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{group_lines, place, Line, TILE_ROWS};
    use crate::ggml_matvec::{BlockFormat, Q8Rows};
    use std::arch::x86_64::*;

    /// An input row's codes, block scales, scaled block sums and exact block sums.
    type InputRow<'a> = (&'a [i8], &'a [f32], &'a [f32], &'a [i32]);

    /// Calls `$kernel::<FORMAT tag, R>(args)` for a runtime format and row count (`≤ 4`).
    macro_rules! by_format_and_rows {
        ($kernel:ident, $format:expr, $count:expr, ($($arg:expr),*)) => {{
            macro_rules! rows {
                ($tag:literal) => {
                    match $count {
                        1 => $kernel::<$tag, 1>($($arg),*),
                        2 => $kernel::<$tag, 2>($($arg),*),
                        3 => $kernel::<$tag, 3>($($arg),*),
                        _ => $kernel::<$tag, 4>($($arg),*),
                    }
                };
            }
            match $format {
                BlockFormat::Q4_0 => rows!(0),
                BlockFormat::Q4_1 => rows!(1),
                BlockFormat::Q8_0 => rows!(2),
                BlockFormat::Q5_0 => rows!(3),
            }
        }};
    }

    /// Input rows `r0..r0+R`, checked to cover `nb` blocks.
    #[inline(always)]
    fn input_rows<const R: usize>(xq: &Q8Rows, r0: usize, nb: usize) -> [InputRow<'_>; R] {
        let rows: [InputRow; R] = std::array::from_fn(|j| {
            let (x, d, s) = xq.row(r0 + j);
            (x, d, s, xq.q_sums(r0 + j))
        });
        for (x, d, s, q) in &rows {
            assert!(x.len() >= nb * 32 && d.len() >= nb && s.len() >= nb && q.len() >= nb);
        }
        rows
    }

    /// One row group against input rows `r0..r0+count` (`count ≤ 4`) into `y`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn group_vnni(
        format: BlockFormat,
        tiles: &[Line],
        nb: usize,
        xq: &Q8Rows,
        r0: usize,
        count: usize,
        y: &mut [[f32; TILE_ROWS]; 4],
    ) {
        by_format_and_rows!(tiles_of, format, count, (tiles, nb, xq, r0, y))
    }

    /// Four activations (bytes `at..at+4` of `x`) in every 32-bit lane.
    #[inline(always)]
    unsafe fn quad(x: *const i8, at: usize) -> __m512i {
        _mm512_set1_epi32((x.add(at) as *const i32).read_unaligned())
    }

    /// The tiles of one group, `R` input rows at once: each tile's codes are loaded (and
    /// Q4's nibbles split) once for the `R` rows. `FORMAT`: a [`BlockFormat::from_tag`] tag.
    ///
    /// No software prefetch (the row kernels of `ggml_matvec` need one, reading four rows
    /// apart): a task's tiles are one sequential stream, which the hardware prefetcher follows
    /// better alone. On the 2-core Zen 4 (tokens/s, medians of 3, 4 alternating rounds), Q8_0
    /// went from 127-137 with `PREFETCH_BYTES` ahead to 141-148 without; Q4_1 stayed 186.
    #[inline(always)]
    unsafe fn tiles_of<const FORMAT: u8, const R: usize>(
        tiles: &[Line],
        nb: usize,
        xq: &Q8Rows,
        r0: usize,
        y: &mut [[f32; TILE_ROWS]; 4],
    ) {
        let format = BlockFormat::from_tag(FORMAT);
        assert!(tiles.len() >= group_lines(format, nb));
        let rows: [InputRow; R] = input_rows(xq, r0, nb);
        let nibble = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        let base = tiles.as_ptr() as *const u8;
        for b in 0..nb {
            let at = place(format, b);
            let tile = base.add(at.codes * 64);
            let scale_line = base.add(at.scales * 64);
            let d = _mm512_cvtph_ps(_mm256_load_si256(scale_line.add(at.d_at) as *const __m256i));
            if format == BlockFormat::Q8_0 {
                let w: [__m512i; 8] =
                    std::array::from_fn(|c| _mm512_load_si512(tile.add(c * 64) as *const _));
                for j in 0..R {
                    let x = rows[j].0.as_ptr().add(b * 32);
                    let mut s = _mm512_set1_epi32(-128 * rows[j].3[b]);
                    for (c, wc) in w.iter().enumerate() {
                        s = _mm512_dpbusd_epi32(s, *wc, quad(x, 4 * c));
                    }
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(rows[j].1[b]));
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j]);
                }
            } else {
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for c in 0..4 {
                    let v = _mm512_load_si512(tile.add(c * 64) as *const _);
                    lo[c] = _mm512_and_si512(v, nibble);
                    hi[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                }
                if format == BlockFormat::Q5_0 {
                    // Bit c (low nibbles) and bit 4+c (high) of each byte, moved to bit 4.
                    // 16-bit shifts: the mask keeps only bits that stayed in their byte.
                    let fifth = _mm512_load_si512(tile.add(4 * 64) as *const _);
                    let bit4 = _mm512_set1_epi8(0x10);
                    for c in 0..4 {
                        let up = _mm512_sll_epi16(fifth, _mm_cvtsi32_si128(4 - c as i32));
                        let down = _mm512_srl_epi16(fifth, _mm_cvtsi32_si128(c as i32));
                        // a | (b & c)
                        lo[c] = _mm512_ternarylogic_epi32::<0xF8>(lo[c], up, bit4);
                        hi[c] = _mm512_ternarylogic_epi32::<0xF8>(hi[c], down, bit4);
                    }
                }
                let m = if format == BlockFormat::Q4_1 {
                    _mm512_cvtph_ps(_mm256_load_si256(scale_line.add(32) as *const __m256i))
                } else {
                    d
                };
                for j in 0..R {
                    let x = rows[j].0.as_ptr().add(b * 32);
                    let mut s = _mm512_setzero_si512();
                    for c in 0..4 {
                        s = _mm512_dpbusd_epi32(s, lo[c], quad(x, 4 * c));
                        s = _mm512_dpbusd_epi32(s, hi[c], quad(x, 16 + 4 * c));
                    }
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(rows[j].1[b]));
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j]);
                    let offset = match format {
                        BlockFormat::Q4_1 => rows[j].2[b],
                        _ => -format.zero_code() * rows[j].2[b],
                    };
                    acc[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(offset), acc[j]);
                }
            }
        }
        for j in 0..R {
            _mm512_storeu_ps(y[j].as_mut_ptr(), acc[j]);
        }
    }

    /// [`group_vnni`] for CPUs with AVX2 but not AVX-512 VNNI: each tile as two halves of 8
    /// rows (the low and high 32 bytes of every line), `vpmaddubsw` pairs into 16 bits, then
    /// 32. Q4's pair sums (at most 2·15·127) add up across a block's 8 quads in 16 bits
    /// without overflow; Q8_0's codes go back to signed bytes, multiplied as `|w|` by
    /// `sign(w)·x` (at most 2·128·127), so no `128·Σx` is taken off.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_avx2(
        format: BlockFormat,
        tiles: &[Line],
        nb: usize,
        xq: &Q8Rows,
        r0: usize,
        count: usize,
        y: &mut [[f32; TILE_ROWS]; 4],
    ) {
        by_format_and_rows!(tiles_of_avx2, format, count, (tiles, nb, xq, r0, y))
    }

    /// Four activations (bytes `at..at+4` of `x`) in every 32-bit lane of 256 bits.
    #[inline(always)]
    unsafe fn quad256(x: *const i8, at: usize) -> __m256i {
        _mm256_set1_epi32((x.add(at) as *const i32).read_unaligned())
    }

    /// [`tiles_of`] in 256-bit halves.
    #[inline(always)]
    unsafe fn tiles_of_avx2<const FORMAT: u8, const R: usize>(
        tiles: &[Line],
        nb: usize,
        xq: &Q8Rows,
        r0: usize,
        y: &mut [[f32; TILE_ROWS]; 4],
    ) {
        let format = BlockFormat::from_tag(FORMAT);
        assert!(tiles.len() >= group_lines(format, nb));
        let rows: [InputRow; R] = input_rows(xq, r0, nb);
        let nibble = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let base = tiles.as_ptr() as *const u8;
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let at = place(format, b);
                let tile = base.add(at.codes * 64);
                let line = |c: usize| _mm256_load_si256(tile.add(c * 64 + half * 32) as *const _);
                let scale_line = base.add(at.scales * 64);
                let d = _mm256_cvtph_ps(_mm_load_si128(
                    scale_line.add(at.d_at + half * 16) as *const _
                ));
                if format == BlockFormat::Q8_0 {
                    let w: [__m256i; 8] = std::array::from_fn(|c| _mm256_xor_si256(line(c), flip));
                    let magnitude: [__m256i; 8] =
                        std::array::from_fn(|c| _mm256_sign_epi8(w[c], w[c]));
                    for j in 0..R {
                        let x = rows[j].0.as_ptr().add(b * 32);
                        let mut s = _mm256_setzero_si256();
                        for c in 0..8 {
                            let xs = _mm256_sign_epi8(quad256(x, 4 * c), w[c]);
                            let pairs = _mm256_maddubs_epi16(magnitude[c], xs);
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(pairs, ones));
                        }
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(rows[j].1[b]));
                        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[j]);
                    }
                } else {
                    let mut lo = [_mm256_setzero_si256(); 4];
                    let mut hi = [_mm256_setzero_si256(); 4];
                    for c in 0..4 {
                        let v = line(c);
                        lo[c] = _mm256_and_si256(v, nibble);
                        hi[c] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                    }
                    if format == BlockFormat::Q5_0 {
                        // As in `tiles_of`.
                        let fifth = line(4);
                        let bit4 = _mm256_set1_epi8(0x10);
                        for c in 0..4 {
                            let up = _mm256_sll_epi16(fifth, _mm_cvtsi32_si128(4 - c as i32));
                            let down = _mm256_srl_epi16(fifth, _mm_cvtsi32_si128(c as i32));
                            lo[c] = _mm256_or_si256(lo[c], _mm256_and_si256(up, bit4));
                            hi[c] = _mm256_or_si256(hi[c], _mm256_and_si256(down, bit4));
                        }
                    }
                    let m = if format == BlockFormat::Q4_1 {
                        _mm256_cvtph_ps(_mm_load_si128(scale_line.add(32 + half * 16) as *const _))
                    } else {
                        d
                    };
                    for j in 0..R {
                        let x = rows[j].0.as_ptr().add(b * 32);
                        // Q5_0's pair sums (at most 2·31·127) only fit four to 16 bits.
                        let mut pairs = [_mm256_setzero_si256(); 2];
                        for c in 0..4 {
                            pairs[0] = _mm256_add_epi16(
                                pairs[0],
                                _mm256_maddubs_epi16(lo[c], quad256(x, 4 * c)),
                            );
                            pairs[1] = _mm256_add_epi16(
                                pairs[1],
                                _mm256_maddubs_epi16(hi[c], quad256(x, 16 + 4 * c)),
                            );
                        }
                        let s = if format == BlockFormat::Q5_0 {
                            _mm256_add_epi32(
                                _mm256_madd_epi16(pairs[0], ones),
                                _mm256_madd_epi16(pairs[1], ones),
                            )
                        } else {
                            _mm256_madd_epi16(_mm256_add_epi16(pairs[0], pairs[1]), ones)
                        };
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(rows[j].1[b]));
                        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[j]);
                        let offset = match format {
                            BlockFormat::Q4_1 => rows[j].2[b],
                            _ => -format.zero_code() * rows[j].2[b],
                        };
                        acc[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(offset), acc[j]);
                    }
                }
            }
            for j in 0..R {
                _mm256_storeu_ps(y[j].as_mut_ptr().add(half * 8), acc[j]);
            }
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

    /// Random blocks of `format` for a `[rows, cols]` weight, with realistic scales.
    fn random_blocks(format: BlockFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let bb = format.block_bytes();
        let mut out = vec![0u8; rows * cols / 32 * bb];
        for blk in out.chunks_exact_mut(bb) {
            for byte in blk.iter_mut() {
                *byte = lcg(&mut s) as u8;
            }
            let d = f16::from_f32(0.001 + (lcg(&mut s) % 1000) as f32 * 1e-5);
            blk[0..2].copy_from_slice(&d.to_le_bytes());
            if format == BlockFormat::Q4_1 {
                let m = f16::from_f32(-0.05 + (lcg(&mut s) % 1000) as f32 * 1e-4);
                blk[2..4].copy_from_slice(&m.to_le_bytes());
            }
        }
        out
    }

    fn random_x(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..m * k)
            .map(|_| (lcg(&mut s) % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }

    const FORMATS: [BlockFormat; 4] = [
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q8_0,
    ];

    #[test]
    fn regrouping_gives_the_same_bytes_back() {
        for format in FORMATS {
            // 37 rows: two whole groups and a partial one.
            let bytes = random_blocks(format, 37, 96, 1);
            let tiled = TiledBlocks::from_blocks(format, &bytes, 37, 96).unwrap();
            assert_eq!(tiled.to_blocks(), bytes, "{format:?}");
        }
    }

    #[test]
    fn dequantizing_matches_the_row_kernels_reference() {
        for format in FORMATS {
            let (rows, cols) = (21, 64);
            let bytes = random_blocks(format, rows, cols, 2);
            let dense = TiledBlocks::from_blocks(format, &bytes, rows, cols)
                .unwrap()
                .dequantize();
            // Row i of the weight is what the row kernel's product with each unit vector
            // gives; check it on the dequantized values through GGML's definition instead.
            let bb = format.block_bytes();
            for row in 0..rows {
                for b in 0..cols / 32 {
                    let blk = &bytes[(row * cols / 32 + b) * bb..][..bb];
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    for e in 0..32 {
                        let want = match format {
                            BlockFormat::Q8_0 => blk[2 + e] as i8 as f32 * d,
                            BlockFormat::Q5_0 => {
                                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                                let q = blk[6 + e % 16];
                                let q = if e < 16 { q & 0x0F } else { q >> 4 } as u32;
                                let q = q | ((qh >> e) & 1) << 4;
                                (q as f32 - 16.0) * d
                            }
                            _ => {
                                let q = blk[bb - 16 + e % 16];
                                let q = if e < 16 { q & 0x0F } else { q >> 4 } as f32;
                                if format == BlockFormat::Q4_1 {
                                    q * d + f16::from_le_bytes([blk[2], blk[3]]).to_f32()
                                } else {
                                    (q - 8.0) * d
                                }
                            }
                        };
                        let got = dense[row * cols + b * 32 + e];
                        assert!(
                            (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                            "{format:?} [{row}, {}]: {got} vs {want}",
                            b * 32 + e
                        );
                    }
                }
            }
        }
    }

    /// The tiled product equals the row kernel's on GGML's layout (both round the
    /// activations the same way; only the f32 accumulation order differs), for decoding's
    /// one row and batched generation's several, a partial last group included.
    #[test]
    fn the_tiled_product_matches_the_row_kernel() {
        for format in FORMATS {
            // 96 columns: an odd number of blocks (Q8_0's last unit is half a unit).
            for (m, rows, cols) in [(1, 48, 128), (1, 37, 96), (3, 37, 128), (8, 64, 96)] {
                let bytes = random_blocks(format, rows, cols, 3 + m as u64);
                let x = random_x(m, cols, 7);
                let want = crate::ggml_matvec::matmul_t(&x, m, cols, &bytes, rows, format).unwrap();
                let tiled = TiledBlocks::from_blocks(format, &bytes, rows, cols).unwrap();
                let got = tiled.matmul_t(&x, m).unwrap();
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * scale,
                        "{format:?} m={m} rows={rows} cols={cols} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Several weights on one input give what each gives alone, whatever the split of
    /// groups over tasks (a task may span two weights).
    #[test]
    fn several_weights_share_one_call() {
        for format in FORMATS {
            let cols = 64;
            let shapes = [37, 16, 5, 80];
            let tiled: Vec<TiledBlocks> = shapes
                .iter()
                .enumerate()
                .map(|(i, &rows)| {
                    let bytes = random_blocks(format, rows, cols, 20 + i as u64);
                    TiledBlocks::from_blocks(format, &bytes, rows, cols).unwrap()
                })
                .collect();
            for m in [1, 3] {
                let x = random_x(m, cols, 21);
                let refs: Vec<&TiledBlocks> = tiled.iter().collect();
                let together = TiledBlocks::matmul_t_many(&refs, &x, m).unwrap();
                for (w, got) in tiled.iter().zip(&together) {
                    assert_eq!(got, &w.matmul_t(&x, m).unwrap(), "{format:?} m={m}");
                }
            }
        }
        let a = TiledBlocks::from_blocks(
            BlockFormat::Q8_0,
            &random_blocks(BlockFormat::Q8_0, 16, 64, 1),
            16,
            64,
        )
        .unwrap();
        let b = TiledBlocks::from_blocks(
            BlockFormat::Q8_0,
            &random_blocks(BlockFormat::Q8_0, 16, 32, 1),
            16,
            32,
        )
        .unwrap();
        assert!(TiledBlocks::matmul_t_many(&[&a, &b], &[0.0; 64], 1).is_err());
    }

    /// The vector kernels (AVX-512 VNNI, AVX2, whichever this CPU has) and the scalar
    /// reference do the same operations in the same order.
    #[test]
    fn the_vector_kernels_equal_the_reference() {
        let isas = Isa::supported();
        println!("instruction sets here: {isas:?}");
        for (format, isa) in FORMATS
            .into_iter()
            .flat_map(|f| isas.iter().map(move |&i| (f, i)))
        {
            let (rows, cols, m) = (32, 256, 5);
            let bytes = random_blocks(format, rows, cols, 11);
            let tiled = TiledBlocks::from_blocks(format, &bytes, rows, cols).unwrap();
            let x = random_x(m, cols, 13);
            let xq = Q8Rows::quantize(&x, cols);
            let mut reference = vec![0f32; rows * m];
            let mut vector = vec![0f32; rows * m];
            for (g, (a, v)) in reference
                .chunks_mut(TILE_ROWS * m)
                .zip(vector.chunks_mut(TILE_ROWS * m))
                .enumerate()
            {
                tiled.groups_into(g, &xq, m, a, Isa::Generic);
                tiled.groups_into(g, &xq, m, v, isa);
            }
            assert_eq!(reference, vector, "{format:?} {isa:?}");
        }
    }

    #[test]
    fn bad_shapes_are_reported() {
        let bytes = random_blocks(BlockFormat::Q4_1, 4, 64, 5);
        assert!(TiledBlocks::from_blocks(BlockFormat::Q4_1, &bytes, 4, 48).is_err());
        assert!(TiledBlocks::from_blocks(BlockFormat::Q4_1, &bytes, 5, 64).is_err());
        assert!(TiledBlocks::from_blocks(BlockFormat::Q5_0, &bytes, 4, 64).is_err());
        let tiled = TiledBlocks::from_blocks(BlockFormat::Q4_1, &bytes, 4, 64).unwrap();
        assert!(tiled.matmul_t(&[0.0; 63], 1).is_err());
    }
}
