//! Attention on the CPU in f32, one (batch, kv head) pair at a time and one block of query
//! rows at a time, over only the keys the mask leaves visible to the block: causal attention
//! computes about half of the score matrix (a key masked for every row of a block adds an exact
//! zero to its softmax, so skipping it changes nothing). The products are single-threaded gemm
//! calls on thread-local blocks and the pairs run in parallel (candle's batched matmul split
//! each of these small products over the threads instead).
//!
//! Same equations as [`crate::attention`] (its module notes); the forward keeps one
//! log-sum-exp per query row, the backward recomputes the probabilities from it.

use rayon::prelude::*;

use candle_core::{DType, Result, Tensor};

use crate::rows;

/// Query rows per block (also the rows of the thread-local score buffer).
const BLOCK_ROWS: usize = 64;

/// A mask value at or below this hides its key (the decoder uses `f32::MIN`).
const HIDDEN: f32 = f32::MIN / 2.0;

/// An additive attention mask `[batches, 1, t, s]` (the same for every head; `batches` is the
/// batch size or 1 for a mask the batch shares), read as f32 rows.
pub(crate) struct RowMask {
    values: Vec<f32>,
    batches: usize,
    t: usize,
    s: usize,
}

impl RowMask {
    /// From a `[batches, 1, t, s]` mask tensor (any dtype).
    pub(crate) fn new(mask: &Tensor) -> Result<Self> {
        let (batches, _, t, s) = mask.dims4()?;
        Ok(RowMask {
            values: mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            batches,
            t,
            s,
        })
    }

    /// The mask row of query position `i` in batch element `bi`.
    fn row(&self, bi: usize, i: usize) -> &[f32] {
        let b = if self.batches == 1 { 0 } else { bi };
        let at = (b * self.t + i) * self.s;
        &self.values[at..at + self.s]
    }
}

/// The geometry of one call: `q: [b, kv, groups·t, d]`, `k`, `v`: `[b, kv, s, d]`, all
/// contiguous f32; output `[b, t, kv·groups·d]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub kv: usize,
    pub groups: usize,
    pub t: usize,
    pub s: usize,
    pub d: usize,
}

impl Dims {
    fn heads(&self) -> usize {
        self.kv * self.groups
    }

    fn q_rows(&self) -> usize {
        self.groups * self.t
    }
}

/// The mask rows and, per mask row, the range of keys it leaves visible. A row that hides every
/// key (a padded query) gets all keys and equal probabilities: `score + f32::MIN` rounds to
/// `f32::MIN` for every key, which is what the composition computes too.
pub(crate) struct Visible {
    mask: Option<RowMask>,
    /// `None` for a row that hides every key.
    ranges: Vec<Option<(usize, usize)>>,
    t: usize,
    s: usize,
}

impl Visible {
    pub(crate) fn new(mask: Option<RowMask>, dims: &Dims) -> Self {
        let (t, s) = (dims.t, dims.s);
        let ranges = match &mask {
            None => vec![],
            Some(m) => (0..m.batches * t)
                .map(|row| {
                    let values = m.row(row / t, row % t);
                    let first = values.iter().position(|&v| v > HIDDEN)?;
                    let last = values.iter().rposition(|&v| v > HIDDEN)?;
                    Some((first, last + 1))
                })
                .collect(),
        };
        Visible { mask, ranges, t, s }
    }

    /// The mask row of query position `i` in batch element `bi`, if there is a mask.
    fn row(&self, bi: usize, i: usize) -> Option<&[f32]> {
        self.mask.as_ref().map(|m| m.row(bi, i))
    }

    fn range(&self, bi: usize, i: usize) -> Option<(usize, usize)> {
        if self.mask.is_none() {
            return Some((0, self.s));
        }
        let batches = self.ranges.len() / self.t;
        self.ranges[if batches == 1 { 0 } else { bi * self.t } + i]
    }

    /// Whether position `i` of batch element `bi` sees no key at all.
    fn hides_all(&self, bi: usize, i: usize) -> bool {
        self.range(bi, i).is_none()
    }

    /// The keys visible to any of the positions `i0..i1` of batch element `bi`.
    fn keys(&self, bi: usize, i0: usize, i1: usize) -> (usize, usize) {
        (i0..i1).fold((self.s, 0), |(a, b), i| {
            let (f, e) = self.range(bi, i).unwrap_or((0, self.s));
            (a.min(f), b.max(e))
        })
    }
}

/// The blocks of one pair's query rows: `(group, first position, end position)`.
fn blocks(dims: &Dims) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..dims.groups).flat_map(move |g| {
        (0..dims.t)
            .step_by(BLOCK_ROWS)
            .map(move |i0| (g, i0, (i0 + BLOCK_ROWS).min(dims.t)))
    })
}

/// `dst (m × n) = [dst +] alpha · lhs (m × k) · rhs (k × n)`, single-threaded; each operand
/// given as (pointer, row stride, column stride).
///
/// # Safety
/// The pointers and strides describe valid, non-overlapping (with `dst`) f32 matrices.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `scores[..nr·nk] = scale · q[r0..r0+nr]·k[k0..k0+nk]ᵀ` (row-major `[nr, nk]`).
fn scaled_scores(
    q: &[f32],
    k: &[f32],
    (r0, nr): (usize, usize),
    (k0, nk): (usize, usize),
    d: usize,
    scale: f32,
    scores: &mut [f32],
) {
    assert!((r0 + nr) * d <= q.len() && (k0 + nk) * d <= k.len() && nr * nk <= scores.len());
    // SAFETY: the bounds above; `scores` is borrowed mutably, so it overlaps neither input.
    unsafe {
        product(
            (nr, nk, d),
            scores.as_mut_ptr(),
            nk,
            false,
            (q[r0 * d..].as_ptr(), d, 1),
            (k[k0 * d..].as_ptr(), 1, d),
            scale,
        )
    }
}

/// One pair's query rows `[groups·t, d]`, and its keys and values `[s, d]`.
fn pair(x: &[f32], pair: usize, rows: usize, d: usize) -> &[f32] {
    &x[pair * rows * d..(pair + 1) * rows * d]
}

/// The forward: the output `[b, t, heads·d]` and one log-sum-exp per query row
/// (`[b, kv, groups·t]`).
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    visible: &Visible,
    dims: &Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, kv, t, s, d, .. } = *dims;
    let rows = dims.q_rows();
    let per_pair: Vec<(Vec<f32>, Vec<f32>)> = (0..b * kv)
        .into_par_iter()
        .map(|p| {
            let (qp, kp, vp) = (pair(q, p, rows, d), pair(k, p, s, d), pair(v, p, s, d));
            let bi = p / kv;
            let mut out = vec![0f32; rows * d];
            let mut lse = vec![0f32; rows];
            let mut scores = vec![0f32; BLOCK_ROWS * s];
            for (g, i0, i1) in blocks(dims) {
                let (k0, k1) = visible.keys(bi, i0, i1);
                let (r0, nr, nk) = (g * t + i0, i1 - i0, k1 - k0);
                scaled_scores(qp, kp, (r0, nr), (k0, nk), d, scale, &mut scores);
                for (j, row) in scores[..nr * nk].chunks_exact_mut(nk).enumerate() {
                    if visible.hides_all(bi, i0 + j) {
                        row.fill(1.0 / nk as f32); // nk = s: such a row widens the range to all
                        lse[r0 + j] = f32::NAN; // unused: the backward refills the row
                        continue;
                    }
                    if let Some(m) = visible.row(bi, i0 + j) {
                        for (x, &mv) in row.iter_mut().zip(&m[k0..k1]) {
                            *x += mv;
                        }
                    }
                    let max = rows::max(row);
                    let sum = rows::exp_minus_in_place(row, max);
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                    lse[r0 + j] = max + sum.ln();
                }
                // SAFETY: the probabilities, values k0..k1, output rows r0..r0+nr.
                unsafe {
                    product(
                        (nr, d, nk),
                        out[r0 * d..].as_mut_ptr(),
                        d,
                        false,
                        (scores.as_ptr(), nk, 1),
                        (vp[k0 * d..].as_ptr(), d, 1),
                        1.0,
                    )
                };
            }
            (out, lse)
        })
        .collect();
    let heads = dims.heads();
    let mut out = vec![0f32; b * t * heads * d];
    let mut lse = Vec::with_capacity(b * kv * rows);
    for (p, (o, l)) in per_pair.into_iter().enumerate() {
        let (bi, h) = (p / kv, p % kv);
        for (r, row) in o.chunks_exact(d).enumerate() {
            let (g, i) = (r / t, r % t);
            let head = h * dims.groups + g;
            out[((bi * t + i) * heads + head) * d..][..d].copy_from_slice(row);
        }
        lse.extend_from_slice(&l);
    }
    (out, lse)
}

/// The gradients `(dq, dk, dv)` (q's and k's layouts) from the forward's inputs, output,
/// log-sum-exp and the output gradient `d_out` (the output's layout).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    visible: &Visible,
    dims: &Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, kv, t, s, d, .. } = *dims;
    let (rows, heads) = (dims.q_rows(), dims.heads());
    let per_pair: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * kv)
        .into_par_iter()
        .map(|p| {
            let (qp, kp, vp) = (pair(q, p, rows, d), pair(k, p, s, d), pair(v, p, s, d));
            let lp = &lse[p * rows..(p + 1) * rows];
            let (bi, h) = (p / kv, p % kv);
            // This pair's output and output gradient, heads-first, and D = rowsum(dO ⊙ O).
            let mut d_o = vec![0f32; rows * d];
            let mut delta = vec![0f32; rows];
            for r in 0..rows {
                let (g, i) = (r / t, r % t);
                let at = ((bi * t + i) * heads + h * dims.groups + g) * d;
                d_o[r * d..(r + 1) * d].copy_from_slice(&d_out[at..at + d]);
                delta[r] = d_out[at..at + d]
                    .iter()
                    .zip(&out[at..at + d])
                    .map(|(a, b)| a * b)
                    .sum();
            }
            let mut dq = vec![0f32; rows * d];
            let mut dk = vec![0f32; s * d];
            let mut dv = vec![0f32; s * d];
            let mut probs = vec![0f32; BLOCK_ROWS * s];
            let mut d_scores = vec![0f32; BLOCK_ROWS * s];
            for (g, i0, i1) in blocks(dims) {
                let (k0, k1) = visible.keys(bi, i0, i1);
                let (r0, nr, nk) = (g * t + i0, i1 - i0, k1 - k0);
                let (qb, dob) = (qp[r0 * d..].as_ptr(), d_o[r0 * d..].as_ptr());
                // S = scale · Q·Kᵀ, then P = exp(S + mask − lse).
                scaled_scores(qp, kp, (r0, nr), (k0, nk), d, scale, &mut d_scores);
                for j in 0..nr {
                    if visible.hides_all(bi, i0 + j) {
                        probs[j * nk..(j + 1) * nk].fill(1.0 / nk as f32);
                        continue;
                    }
                    let mask = visible.row(bi, i0 + j).map(|m| &m[k0..k1]);
                    rows::exp_into(
                        &mut probs[j * nk..(j + 1) * nk],
                        &d_scores[j * nk..(j + 1) * nk],
                        mask,
                        lp[r0 + j],
                    );
                }
                // SAFETY (all products below): row blocks r0..r0+nr of q, dO and dq, key rows
                // k0..k1 of k, v, dk and dv, nr × nk blocks of the two score buffers.
                unsafe {
                    // dV += Pᵀ·dO.
                    product(
                        (nk, d, nr),
                        dv[k0 * d..].as_mut_ptr(),
                        d,
                        true,
                        (probs.as_ptr(), 1, nk),
                        (dob, d, 1),
                        1.0,
                    );
                    // dP = dO·Vᵀ.
                    product(
                        (nr, nk, d),
                        d_scores.as_mut_ptr(),
                        nk,
                        false,
                        (dob, d, 1),
                        (vp[k0 * d..].as_ptr(), 1, d),
                        1.0,
                    );
                }
                // dS = scale · P ⊙ (dP − D).
                for j in 0..nr {
                    let dl = delta[r0 + j];
                    let (ds, pr) = (
                        &mut d_scores[j * nk..(j + 1) * nk],
                        &probs[j * nk..(j + 1) * nk],
                    );
                    for (x, &pv) in ds.iter_mut().zip(pr) {
                        *x = scale * pv * (*x - dl);
                    }
                }
                unsafe {
                    // dQ = dS·K, dK += dSᵀ·Q.
                    product(
                        (nr, d, nk),
                        dq[r0 * d..].as_mut_ptr(),
                        d,
                        false,
                        (d_scores.as_ptr(), nk, 1),
                        (kp[k0 * d..].as_ptr(), d, 1),
                        1.0,
                    );
                    product(
                        (nk, d, nr),
                        dk[k0 * d..].as_mut_ptr(),
                        d,
                        true,
                        (d_scores.as_ptr(), 1, nk),
                        (qb, d, 1),
                        1.0,
                    );
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = Vec::with_capacity(q.len());
    let mut dk = Vec::with_capacity(k.len());
    let mut dv = Vec::with_capacity(v.len());
    for (q, k, v) in per_pair {
        dq.extend_from_slice(&q);
        dk.extend_from_slice(&k);
        dv.extend_from_slice(&v);
    }
    (dq, dk, dv)
}
