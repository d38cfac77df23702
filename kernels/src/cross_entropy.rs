//! Cross-entropy of a linear head over a large vocabulary, in chunks of the vocabulary, without
//! ever materialising the `[tokens, vocab]` logits or their gradient.
//!
//! For each chunk of `C` vocabulary rows of the head `W_c`: `l = h·W_cᵀ` (`[n, C]`), then an
//! online log-sum-exp per token (running max `m`, running sum `s`, the target's logit) and, when
//! `h` needs a gradient, the softmax-weighted sum of head rows accumulated like flash
//! attention's output: `acc ← acc·e^{m_old−m} + e^{l−m}·W_c`. At the end
//! `softmax·W = acc/s`, so `dL/dh = (acc/s − W[label]) / count`: the gradient is computed in the
//! forward with the logits still in cache-sized chunks, two matmuls per chunk in all (no
//! recomputation of the logits in the backward), and kept (`[n, hidden]`) for the backward,
//! which only scales it by the incoming gradient. Tokens labelled [`IGNORE_INDEX`] are dropped
//! before any work is done.

use candle_core::{
    bail, CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use crate::common::{cpu_dtype, dispatch_float, slice, with_cpu_f32, Float};
use crate::lora::Int8Products;
use crate::q8_gemm::{self, Q8Error, Q8Rows};

/// The label value that excludes a token from the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A vocabulary chunk that keeps a `[1024, chunk]` f32 logits block at 8 MiB. Against 8,192
/// (32 MiB) on the SmolLM2 f32 LoRA step (Zen 4, three alternating rounds): 242-247 → 254-263
/// tokens/s (4,096 measured the same as 2,048).
pub const DEFAULT_CHUNK: usize = 2048;

/// Mean cross-entropy of `softmax(hidden·headᵀ)` against `labels`, over the tokens whose label is
/// not [`IGNORE_INDEX`]; returns the loss (scalar, f32, or f64 for f64 input) and that count.
///
/// `hidden: [.., h]` (any float dtype), `head: [vocab, h]` (frozen; same dtype as `hidden`),
/// `labels: [..]` (u32 or i64, the leading dims of `hidden`; `-100` = ignored). No shift is
/// applied: for a causal LM pass `hidden[:, :-1]` and `labels[:, 1:]`. Only `hidden` gets a
/// gradient. `chunk` vocabulary rows are processed at a time ([`DEFAULT_CHUNK`]).
pub fn fused_linear_cross_entropy(
    hidden: &Tensor,
    head: &Tensor,
    labels: &Tensor,
    chunk: usize,
) -> Result<(Tensor, usize)> {
    cross_entropy(hidden, head, labels, Products::Dense { chunk })
}

/// [`fused_linear_cross_entropy`] with the head's two products per chunk on the integer GEMM
/// (`products`, built from `head`): `hidden` and the chunk's `e^{l−m}` are rounded to 8 bits
/// per block of 64 on the way in, as a quantized base's layers round theirs. `head` itself
/// (f32, CPU) still gives the target rows, exactly. On AVX512-VNNI the two products run about
/// three times the f32 rate: the head is most of the step's f32 work over a quantized base.
pub fn fused_linear_cross_entropy_int8(
    hidden: &Tensor,
    head: &Tensor,
    products: &Int8Head,
    labels: &Tensor,
) -> Result<(Tensor, usize)> {
    let (vocab, hd) = head.dims2()?;
    if (vocab, hd) != (products.vocab, products.hidden) {
        bail!(
            "cross_entropy: head {:?} is not the one its integer products were built from ({}, {})",
            head.dims(),
            products.vocab,
            products.hidden
        )
    }
    if hidden.dtype() != DType::F32 || !hidden.device().is_cpu() {
        bail!(
            "cross_entropy: the integer head takes f32 on the CPU, got {:?} on {:?}",
            hidden.dtype(),
            hidden.device().location()
        )
    }
    cross_entropy(hidden, head, labels, Products::Int8(products))
}

/// A frozen head `[vocab, hidden]` held for the integer GEMM, vocabulary chunk by chunk, each
/// chunk as a frozen layer's weight is ([`Int8Products`]: its rows for `h·W_cᵀ`, transposed
/// for `p·W_c`). Two bytes and a bit per weight.
pub struct Int8Head {
    vocab: usize,
    hidden: usize,
    chunks: Vec<Int8Products>,
}

impl std::fmt::Debug for Int8Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Int8Head[{}, {}]", self.vocab, self.hidden)
    }
}

impl Int8Head {
    /// Whether a head of this shape can be held this way: both dimensions in whole blocks.
    pub fn fits(vocab: usize, hidden: usize) -> bool {
        vocab.is_multiple_of(q8_gemm::BLOCK) && hidden.is_multiple_of(q8_gemm::BLOCK)
    }

    /// `w: [vocab, hidden]` row-major, in chunks of [`DEFAULT_CHUNK`] rows.
    pub fn new(w: &[f32], vocab: usize, hidden: usize) -> std::result::Result<Self, Q8Error> {
        if w.len() != vocab * hidden {
            return Err(Q8Error::Len {
                what: "head",
                expected: vocab * hidden,
                got: w.len(),
            });
        }
        if !vocab.is_multiple_of(q8_gemm::BLOCK) {
            return Err(Q8Error::Cols(vocab));
        }
        let chunks = (0..vocab)
            .step_by(DEFAULT_CHUNK)
            .map(|v0| {
                let c = DEFAULT_CHUNK.min(vocab - v0);
                Int8Products::new(&w[v0 * hidden..(v0 + c) * hidden], c, hidden)
            })
            .collect::<std::result::Result<_, Q8Error>>()?;
        Ok(Int8Head {
            vocab,
            hidden,
            chunks,
        })
    }

    pub fn size_in_bytes(&self) -> usize {
        self.chunks.iter().map(Int8Products::size_in_bytes).sum()
    }
}

/// How the loop multiplies by the head's chunks.
enum Products<'a> {
    /// The head tensor itself, `chunk` rows at a time.
    Dense {
        chunk: usize,
    },
    Int8(&'a Int8Head),
}

fn cross_entropy(
    hidden: &Tensor,
    head: &Tensor,
    labels: &Tensor,
    products: Products<'_>,
) -> Result<(Tensor, usize)> {
    let hd = hidden.dim(D::Minus1)?;
    let (vocab, hw) = head.dims2()?;
    let n = hidden.elem_count() / hd.max(1);
    if hw != hd || labels.elem_count() != n || labels.dims() != &hidden.dims()[..hidden.rank() - 1]
    {
        bail!(
            "cross_entropy: hidden {:?}, head {:?}, labels {:?} do not fit",
            hidden.dims(),
            head.dims(),
            labels.dims()
        )
    }
    if head.dtype() != hidden.dtype() {
        bail!(
            "cross_entropy: head is {:?}, hidden is {:?}",
            head.dtype(),
            hidden.dtype()
        )
    }
    let dev = hidden.device();
    let compute = cpu_dtype(dev, hidden.dtype());
    let acc = if compute == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };

    // The counted tokens, validated on the host.
    let labels_host: Vec<i64> = labels.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    let mut rows = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    for (i, &y) in labels_host.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        if y < 0 || y as usize >= vocab {
            bail!("cross_entropy: label {y} is outside the vocabulary ({vocab})")
        }
        rows.push(i as u32);
        targets.push(y as u32);
    }
    let count = rows.len();
    if count == 0 {
        bail!("cross_entropy: every label is ignored (-100): nothing to learn from")
    }
    let head = head.detach().to_dtype(compute)?.contiguous()?;
    let h2 = hidden.detach().to_dtype(compute)?.reshape((n, hd))?;
    let rows = Tensor::from_vec(rows, count, dev)?;
    let h_sel = if count == n {
        h2.contiguous()?
    } else {
        h2.index_select(&rows, 0)?
    };
    let targets = Tensor::from_vec(targets, count, dev)?;
    let want_grad = hidden.track_op();

    let mut state = Tensor::zeros((count, 4), acc, dev)?;
    state = state.slice_assign(
        &[0..count, 0..1],
        &Tensor::full(f32::NEG_INFINITY, (count, 1), dev)?.to_dtype(acc)?,
    )?;
    let mut sum_w = want_grad
        .then(|| Tensor::zeros((count, hd), acc, dev))
        .transpose()?;
    let (chunk, h_q8) = match products {
        Products::Dense { chunk } => (chunk.max(1), None),
        Products::Int8(p) => {
            let rows = with_cpu_f32(&h_sel, |h| Q8Rows::new(h, count, hd))?;
            (
                DEFAULT_CHUNK,
                Some((p, rows.map_err(candle_core::Error::wrap)?)),
            )
        }
    };
    for (i, v0) in (0..vocab).step_by(chunk).enumerate() {
        let c = chunk.min(vocab - v0);
        let w_c = head.narrow(0, v0, c)?;
        let logits = match &h_q8 {
            None => h_sel.matmul(&w_c.t()?)?,
            Some((p, h)) => Tensor::from_vec(p.chunks[i].forward_rows(h)?, (count, c), dev)?,
        };
        state = logits.apply_op3_no_bwd(&targets, &state, &ChunkStats { v0 })?;
        if let Some(acc_w) = sum_w.as_mut() {
            // logits ← e^{l − m}, then acc ← acc·α + e^{l−m}·W_c.
            logits.inplace_op2(&state, &ExpShifted)?;
            let alpha = state.narrow(1, 3, 1)?;
            let pw = match &h_q8 {
                None => logits.matmul(&w_c)?.to_dtype(acc)?,
                Some((p, _)) => p.chunks[i].input_gradient(&logits)?,
            };
            *acc_w = (acc_w.broadcast_mul(&alpha)? + pw)?;
        }
    }
    let m = state.narrow(1, 0, 1)?;
    let s = state.narrow(1, 1, 1)?;
    let lse = (m + s.log()?)?;
    let loss = ((lse - state.narrow(1, 2, 1)?)?.sum_all()? / count as f64)?;

    let Some(acc_w) = sum_w else {
        return Ok((loss, count));
    };
    let target_rows = head.index_select(&targets, 0)?.to_dtype(acc)?;
    let dh_sel = ((acc_w.broadcast_div(&s)? - target_rows)? / count as f64)?;
    let dh = if count == n {
        dh_sel
    } else {
        Tensor::zeros((n, hd), acc, dev)?.index_add(&rows, &dh_sel, 0)?
    };
    let (shape, dtype) = (hidden.shape().clone(), hidden.dtype());
    let loss = crate::frozen::reattach(hidden, loss, move |g| {
        dh.broadcast_mul(&g.to_dtype(dh.dtype())?)?
            .reshape(&shape)?
            .to_dtype(dtype)
    })?;
    Ok((loss, count))
}

/// From `(logits [n, C], targets [n] u32, state [n, 4])` the next state `(m, s, target logit,
/// α = e^{m_old − m})` after the vocabulary rows `v0..v0+C`.
struct ChunkStats {
    v0: usize,
}

impl CustomOp3 for ChunkStats {
    fn name(&self) -> &'static str {
        "peft-ce-chunk-stats"
    }

    fn cpu_fwd(
        &self,
        l: &CpuStorage,
        ll: &Layout,
        t: &CpuStorage,
        tl: &Layout,
        st: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(l: &[T], t: &[u32], st: &[T], c: usize, v0: usize) -> CpuStorage {
            let mut out = vec![T::zero(); st.len()];
            out.par_chunks_mut(4)
                .zip(l.par_chunks(c))
                .zip(t.par_iter().zip(st.par_chunks(4)))
                .for_each(|((o, row), (&t, s))| {
                    let m = T::max_row(row).fmax(s[0]);
                    let alpha = (s[0] - m).exp();
                    let sum = T::sum_exp_minus_row(row, m);
                    let t = t as usize;
                    let tgt = if (v0..v0 + c).contains(&t) {
                        row[t - v0]
                    } else {
                        T::zero()
                    };
                    o[0] = m;
                    o[1] = s[1] * alpha + sum;
                    o[2] = s[2] + tgt;
                    o[3] = alpha;
                });
            T::to_cpu_storage_owned(out)
        }
        let op = self.name();
        let c = ll.dims()[1];
        let t = slice::<u32>(t, tl, op)?;
        let s = dispatch_float!(
            op,
            l.dtype(),
            run(slice(l, ll, op)?, t, slice(st, sl, op)?, c, self.v0)
        );
        Ok((s, sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        l: &candle_core::CudaStorage,
        ll: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
        st: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::ce_chunk_stats(l, ll, t, tl, st, sl, self.v0)?;
        Ok((out, sl.shape().clone()))
    }
}

/// In place: `l ← e^{l − m}` per row, `m` from the state.
struct ExpShifted;

impl InplaceOp2 for ExpShifted {
    fn name(&self) -> &'static str {
        "peft-ce-exp-shifted"
    }

    fn cpu_fwd(&self, l: &mut CpuStorage, ll: &Layout, st: &CpuStorage, sl: &Layout) -> Result<()> {
        fn run<T: Float>(l: &mut CpuStorage, ll: &Layout, st: &[T]) -> Result<()> {
            let Some((a, b)) = ll.contiguous_offsets() else {
                bail!("ce: logits not contiguous")
            };
            let c = ll.dims()[1];
            let l = &mut T::storage_mut(l)?[a..b];
            l.par_chunks_mut(c)
                .zip(st.par_chunks(4))
                .for_each(|(row, s)| T::exp_minus_row(row, s[0]));
            Ok(())
        }
        let op = self.name();
        dispatch_float!(op, st.dtype(), run(l, ll, slice(st, sl, op)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        l: &mut candle_core::CudaStorage,
        ll: &Layout,
        st: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        crate::cuda::ce_exp_shifted(l, ll, st, sl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grad_of};
    use candle_core::{Device, Var};

    fn reference(h: &Tensor, head: &Tensor, labels: &[i64]) -> Result<Tensor> {
        let logits = h.broadcast_matmul(&head.t()?)?;
        let v = head.dim(0)?;
        let logits = logits.reshape(((), v))?;
        let lsm = (logits.broadcast_sub(&logits.max_keepdim(1)?)?)
            .exp()?
            .sum_keepdim(1)?
            .log()?;
        let lsm = logits.broadcast_sub(&(lsm + logits.max_keepdim(1)?)?)?;
        let (mut idx, mut w) = (vec![], vec![]);
        for &y in labels {
            idx.push(if y < 0 { 0u32 } else { y as u32 });
            w.push(if y < 0 { 0f64 } else { 1.0 });
        }
        let count = w.iter().sum::<f64>();
        let idx = Tensor::from_vec(idx, (labels.len(), 1), h.device())?;
        let w = Tensor::from_vec(w, labels.len(), h.device())?.to_dtype(h.dtype())?;
        let picked = lsm.gather(&idx, 1)?.squeeze(1)?;
        (picked * w)?.sum_all()? / -count
    }

    #[test]
    fn matches_the_composition_with_ignored_tokens_and_uneven_chunks() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let (b, t, hd, v) = (2, 7, 24, 53);
            let h = Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, hd), &dev)?.to_dtype(dtype)?)?;
            let head = Tensor::randn(0f32, 0.5, (v, hd), &dev)?.to_dtype(dtype)?;
            let mut labels: Vec<i64> = (0..b * t).map(|i| (i * 17 % v) as i64).collect();
            labels[0] = IGNORE_INDEX;
            labels[5] = IGNORE_INDEX;
            labels[9] = (v - 1) as i64;
            let lt = Tensor::from_vec(labels.clone(), (b, t), &dev)?;
            let one = Tensor::ones((), dtype, &dev)?;
            for chunk in [8, 16, 53, 1000] {
                let (loss, dh) = grad_of(&h, &one, |h| {
                    fused_linear_cross_entropy(h, &head, &lt, chunk)?
                        .0
                        .to_dtype(dtype)
                })?;
                let (loss_ref, dh_ref) = grad_of(&h, &one, |h| reference(h, &head, &labels))?;
                assert_close("ce loss", &loss, &loss_ref, 1e-5)?;
                assert_close("ce dh", &dh, &dh_ref, 1e-5)?;
            }
        }
        Ok(())
    }

    #[test]
    fn counts_tokens_and_scales_by_the_incoming_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1., (5, 8), &dev)?;
        let head = Tensor::randn(0f32, 1., (11, 8), &dev)?;
        let labels = Tensor::new(&[3u32, 1, 10, 0, 2], &dev)?;
        let (loss, count) = fused_linear_cross_entropy(&h, &head, &labels, 4)?;
        assert_eq!(count, 5);
        let g1 = loss.backward()?;
        let g3 = (loss * 3.)?.backward()?;
        let ratio = (g3.get(&h).unwrap() / g1.get(&h).unwrap())?;
        assert_close("scaled", &ratio, &Tensor::full(3f32, (5, 8), &dev)?, 1e-6)?;
        let all_ignored = Tensor::new(&[-100i64; 5], &dev)?;
        assert!(fused_linear_cross_entropy(&h, &head, &all_ignored, 4).is_err());
        let bad = Tensor::new(&[11i64, 0, 0, 0, 0], &dev)?;
        assert!(fused_linear_cross_entropy(&h, &head, &bad, 4).is_err());
        Ok(())
    }

    #[test]
    fn the_integer_head_follows_the_exact_loss_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // Three chunks, the last one partial (2,048 + 2,048 + 64 rows).
        let (b, t, hd, v) = (2, 9, 128, 2 * DEFAULT_CHUNK + 64);
        let h = Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, hd), &dev)?)?;
        let head = Tensor::randn(0f32, 0.1, (v, hd), &dev)?;
        let mut labels: Vec<i64> = (0..b * t).map(|i| (i * 977 % v) as i64).collect();
        labels[4] = IGNORE_INDEX;
        labels[11] = (v - 1) as i64;
        let lt = Tensor::from_vec(labels.clone(), (b, t), &dev)?;
        let products = Int8Head::new(&head.flatten_all()?.to_vec1::<f32>()?, v, hd)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(products.chunks.len(), 3);
        let one = Tensor::ones((), DType::F32, &dev)?;
        let (loss, dh) = grad_of(&h, &one, |h| {
            let (loss, count) = fused_linear_cross_entropy_int8(h, &head, &products, &lt)?;
            assert_eq!(count, b * t - 1);
            Ok(loss)
        })?;
        let (loss_ref, dh_ref) = grad_of(&h, &one, |h| reference(h, &head, &labels))?;
        // 8-bit blocks of 64 for h, the head and e^{l−m}: about 1/254 of each block's largest
        // value per element, not the f32 path's 1e-5.
        assert_close("int8 ce loss", &loss, &loss_ref, 2e-3)?;
        assert_close("int8 ce dh", &dh, &dh_ref, 5e-3)?;
        let exact = fused_linear_cross_entropy(h.as_tensor(), &head, &lt, DEFAULT_CHUNK)?.0;
        assert_ne!(loss.to_scalar::<f32>()?, exact.to_scalar::<f32>()?);

        // A head that is not the one the products hold is refused.
        let other = Tensor::zeros((v - 64, hd), DType::F32, &dev)?;
        assert!(fused_linear_cross_entropy_int8(h.as_tensor(), &other, &products, &lt).is_err());
        assert!(Int8Head::new(&[0.; 65 * 64], 65, 64).is_err());
        Ok(())
    }
}
