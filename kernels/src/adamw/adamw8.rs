//! AdamW with block-wise 8-bit moments (`optim="adamw_8bit"`), the state on the parameter's
//! device as one `u8` tensor.
//!
//! Each block of [`BLOCK`] values keeps one f32 scale per moment. The first moment is signed
//! and stored linearly (`code = round(m·127/absmax) + 128`, in 1..=255); the second is
//! non-negative and spans many orders of magnitude, so its square root is stored
//! (`code = round(√v·255/max √v)`), halving the exponent range the 8 bits must cover. Not
//! bitsandbytes' dynamic code; the same memory: 2 bytes per parameter for both moments
//! instead of 8 (plus 8 bytes per 256 values).
//!
//! State layout (`n` parameters, `nb = ⌈n / 256⌉` blocks): `m` codes `[n]`, `v` codes `[n]`,
//! zero padding to a multiple of 4 bytes, then `m` scales `[nb]` and `v` scales `[nb]` as
//! little-endian f32. The parameter is updated from the unrounded new moments; only what is
//! stored is rounded.

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::{check_operands, AdamWStep};
use crate::common::slice;
use crate::rows::multiversion;

/// Values per quantization block (bitsandbytes uses 256 as well); also the CUDA block size of
/// the moments kernel.
pub const BLOCK: usize = 256;

/// Blocks per parallel task on the CPU.
const BLOCKS_PER_TASK: usize = 64;

/// Where the pieces of an `n`-parameter state lie, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout8 {
    pub n: usize,
    pub blocks: usize,
    /// Byte offset of the `m` scales (the `v` scales follow them).
    pub scales_offset: usize,
}

impl Layout8 {
    pub fn new(n: usize) -> Self {
        Layout8 {
            n,
            blocks: n.div_ceil(BLOCK),
            scales_offset: (2 * n).div_ceil(4) * 4,
        }
    }

    pub fn bytes(&self) -> usize {
        self.scales_offset + 8 * self.blocks
    }
}

/// `(c − 128) / 127` and `c / 255` for every code: the divisions of the decode, done once
/// (the same f32 values the kernel computes per element).
struct Unit {
    signed: [f32; 256],
    unsigned: [f32; 256],
}

static UNIT: std::sync::LazyLock<Unit> = std::sync::LazyLock::new(|| Unit {
    signed: std::array::from_fn(|c| (c as f32 - 128.0) / 127.0),
    unsigned: std::array::from_fn(|c| c as f32 / 255.0),
});

impl Unit {
    /// The stored value of a first-moment code: `(c − 128) / 127 · scale`.
    #[inline(always)]
    fn signed(&self, c: u8, scale: f32) -> f32 {
        self.signed[c as usize] * scale
    }

    /// The stored value of a second-moment code: `(c / 255 · scale)²`.
    #[inline(always)]
    fn unsigned(&self, c: u8, scale: f32) -> f32 {
        let r = self.unsigned[c as usize] * scale;
        r * r
    }
}

#[inline(always)]
fn encode_signed(m: f32, absmax: f32) -> u8 {
    let inv = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
    ((m * inv).round() + 128.0).clamp(1.0, 255.0) as u8
}

/// `root` is `√max(v, 0)`; `max` the block's largest root.
#[inline(always)]
fn encode_unsigned(root: f32, max: f32) -> u8 {
    let inv = if max > 0.0 { 255.0 / max } else { 0.0 };
    (root * inv).round().clamp(0.0, 255.0) as u8
}

/// A borrowed state.
struct View<'a> {
    unit: &'static Unit,
    codes: &'a [u8],
    scales: Vec<f32>,
    n: usize,
    blocks: usize,
}

impl<'a> View<'a> {
    fn new(bytes: &'a [u8], n: usize) -> Result<Self> {
        let l = Layout8::new(n);
        if bytes.len() != l.bytes() {
            bail!(
                "adamw_8bit: a state of {} bytes for {n} parameters, expected {}",
                bytes.len(),
                l.bytes()
            )
        }
        let scales = bytes[l.scales_offset..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(View {
            unit: &UNIT,
            codes: &bytes[..2 * n],
            scales,
            n,
            blocks: l.blocks,
        })
    }

    #[inline(always)]
    fn m(&self, i: usize) -> f32 {
        self.unit.signed(self.codes[i], self.scales[i / BLOCK])
    }

    #[inline(always)]
    fn v(&self, i: usize) -> f32 {
        self.unit
            .unsigned(self.codes[self.n + i], self.scales[self.blocks + i / BLOCK])
    }
}

/// A state holding the given moments, on `device` (for a fresh optimizer and for resuming from
/// a checkpoint, which stores the moments dequantized).
pub fn encode(m: &[f32], v: &[f32], device: &Device) -> Result<Tensor> {
    if m.len() != v.len() {
        bail!(
            "adamw_8bit: {} first and {} second moments",
            m.len(),
            v.len()
        )
    }
    let n = m.len();
    let l = Layout8::new(n);
    let mut bytes = vec![0u8; l.bytes()];
    blocks_mut(&mut bytes, n).for_each(|(b, block)| {
        let range = b * BLOCK..b * BLOCK + block.m_codes.len();
        block.encode(&m[range.clone()], &v[range]);
    });
    Tensor::from_vec(bytes, l.bytes(), device)
}

/// One block of a state being written: its codes and the bytes of its two scales.
struct BlockMut<'a> {
    m_codes: &'a mut [u8],
    v_codes: &'a mut [u8],
    m_scale: &'a mut [u8],
    v_scale: &'a mut [u8],
}

impl BlockMut<'_> {
    /// Quantizes the block's new moments into its codes and scales.
    #[inline(always)]
    fn encode(self, m: &[f32], v: &[f32]) {
        let absmax = m.iter().fold(0f32, |a, x| a.max(x.abs()));
        let max_root = v.iter().fold(0f32, |a, x| a.max(x.max(0.0).sqrt()));
        for (c, &x) in self.m_codes.iter_mut().zip(m) {
            *c = encode_signed(x, absmax);
        }
        for (c, &x) in self.v_codes.iter_mut().zip(v) {
            *c = encode_unsigned(x.max(0.0).sqrt(), max_root);
        }
        self.m_scale.copy_from_slice(&absmax.to_le_bytes());
        self.v_scale.copy_from_slice(&max_root.to_le_bytes());
    }
}

/// The blocks of an `n`-parameter state (`bytes`, the layout's size), in parallel, with their
/// indices; a few dozen per task (one per block spent more time in the scheduler than in the
/// arithmetic for the many small LoRA matrices).
fn blocks_mut(
    bytes: &mut [u8],
    n: usize,
) -> impl IndexedParallelIterator<Item = (usize, BlockMut<'_>)> {
    let l = Layout8::new(n);
    let (codes, rest) = bytes.split_at_mut(2 * n);
    let (mc, vc) = codes.split_at_mut(n);
    let (ms, vs) = rest[l.scales_offset - 2 * n..].split_at_mut(4 * l.blocks);
    mc.par_chunks_mut(BLOCK)
        .zip(vc.par_chunks_mut(BLOCK))
        .zip(ms.par_chunks_mut(4).zip(vs.par_chunks_mut(4)))
        .map(|((m_codes, v_codes), (m_scale, v_scale))| BlockMut {
            m_codes,
            v_codes,
            m_scale,
            v_scale,
        })
        .enumerate()
        .with_min_len(BLOCKS_PER_TASK)
}

/// A state of zero moments for `n` parameters.
pub fn zeros(n: usize, device: &Device) -> Result<Tensor> {
    let zero = vec![0f32; n];
    encode(&zero, &zero, device)
}

/// The stored moments `(m, v)` on the host (for checkpoints).
pub fn decode(state: &Tensor, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let bytes = state.flatten_all()?.to_vec1::<u8>()?;
    let view = View::new(&bytes, n)?;
    Ok((
        (0..n).map(|i| view.m(i)).collect(),
        (0..n).map(|i| view.v(i)).collect(),
    ))
}

/// One AdamW step on `p` (f32, contiguous) with gradient `g` and the 8-bit `state` (u8, see
/// the module notes), on their device. Returns the new parameter (`p`'s shape) and the new
/// state; nothing is modified in place.
pub fn adamw8_step(
    p: &Tensor,
    g: &Tensor,
    state: &Tensor,
    s: AdamWStep,
) -> Result<(Tensor, Tensor)> {
    let n = p.elem_count();
    check_operands("adamw_8bit", p, g)?;
    let expected = Layout8::new(n).bytes();
    if state.dtype() != DType::U8 || state.dims() != [expected] {
        bail!(
            "adamw_8bit: the state must be u8 [{expected}] for {n} parameters, got {:?} {:?}",
            state.dtype(),
            state.dims()
        )
    }
    let g = g.contiguous()?;
    let new_state = g.apply_op2_no_bwd(state, &Moments8(s))?;
    let new_p = p
        .contiguous()?
        .apply_op3_no_bwd(&g, state, &Param8(s))?
        .reshape(p.shape())?;
    Ok((new_p, new_state))
}

multiversion! {
    /// The new 8-bit state into `bytes` (zeroed, the layout's size) from `g` and the old state.
    fn new_moments8(g: &[f32], old: &View<'_>, bytes: &mut [u8], s: AdamWStep) {
        blocks_mut(bytes, g.len()).for_each(|(b, block)| {
            let mut m = [0f32; BLOCK];
            let mut v = [0f32; BLOCK];
            let len = block.m_codes.len();
            for j in 0..len {
                let i = b * BLOCK + j;
                (m[j], v[j]) = s.moments(g[i], old.m(i), old.v(i));
            }
            block.encode(&m[..len], &v[..len]);
        });
    }
}

multiversion! {
    /// The new parameter into `out` from the unrounded new moments.
    fn new_param8(p: &[f32], g: &[f32], old: &View<'_>, out: &mut [f32], s: AdamWStep) {
        out.par_chunks_mut(1 << 14).enumerate().for_each(|(c, o)| {
            for (j, o) in o.iter_mut().enumerate() {
                let i = c * (1 << 14) + j;
                let (m, v) = s.moments(g[i], old.m(i), old.v(i));
                *o = s.param(p[i], m, v);
            }
        });
    }
}

/// `(g, state) -> state'`.
struct Moments8(AdamWStep);

impl CustomOp2 for Moments8 {
    fn name(&self) -> &'static str {
        "peft-adamw8-moments"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        st: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let g = slice::<f32>(g, gl, op)?;
        let n = g.len();
        let old = View::new(slice::<u8>(st, sl, op)?, n)?;
        let l = Layout8::new(n);
        let mut bytes = vec![0u8; l.bytes()];
        new_moments8(g, &old, &mut bytes, self.0);
        Ok((CpuStorage::U8(bytes), Shape::from(l.bytes())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        st: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = gl.shape().elem_count();
        let out = crate::cuda::adamw8_moments(g, gl, st, sl, &Layout8::new(n), &self.0)?;
        Ok((out, Shape::from(Layout8::new(n).bytes())))
    }
}

/// `(p, g, state) -> p'` (flat), from the unrounded new moments.
struct Param8(AdamWStep);

impl CustomOp3 for Param8 {
    fn name(&self) -> &'static str {
        "peft-adamw8-param"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        st: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (p, g) = (slice::<f32>(p, pl, op)?, slice::<f32>(g, gl, op)?);
        let n = p.len();
        let old = View::new(slice::<u8>(st, sl, op)?, n)?;
        let mut out = vec![0f32; n];
        new_param8(p, g, &old, &mut out, self.0);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        st: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = pl.shape().elem_count();
        let out = crate::cuda::adamw8_param(p, pl, g, gl, st, sl, &Layout8::new(n), &self.0)?;
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pseudo_random;

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        pseudo_random(n, seed).iter().map(|x| x * scale).collect()
    }

    #[test]
    fn layout_pads_the_codes_to_whole_f32s() {
        assert_eq!(Layout8::new(1).scales_offset, 4);
        assert_eq!(Layout8::new(1).bytes(), 12);
        assert_eq!(Layout8::new(256).bytes(), 512 + 8);
        assert_eq!(Layout8::new(257).bytes(), 516 + 16);
    }

    #[test]
    fn encoding_keeps_each_moment_within_half_a_step_of_its_block_scale() -> Result<()> {
        let n = 1000; // a partial last block
        let m = values(n, 1, 0.2);
        let v: Vec<f32> = values(n, 2, 1e-3).iter().map(|x| x * x).collect();
        let state = encode(&m, &v, &Device::Cpu)?;
        let (m2, v2) = decode(&state, n)?;
        for b in 0..n.div_ceil(BLOCK) {
            let r = b * BLOCK..((b + 1) * BLOCK).min(n);
            let absmax = m[r.clone()].iter().fold(0f32, |a, x| a.max(x.abs()));
            let max_root = v[r.clone()].iter().fold(0f32, |a, x| a.max(x.sqrt()));
            for i in r {
                assert!((m2[i] - m[i]).abs() <= absmax / 254.0 * 1.001, "m[{i}]");
                assert!(
                    (v2[i].sqrt() - v[i].sqrt()).abs() <= max_root / 510.0 * 1.001,
                    "v[{i}]"
                );
            }
        }
        Ok(())
    }

    /// The step against the same arithmetic written out with the plain f32 update.
    #[test]
    fn a_step_updates_from_the_decoded_moments_and_stores_the_new_ones_rounded() -> Result<()> {
        let n = 600;
        let s = AdamWStep::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 4);
        let (p, g) = (values(n, 3, 1.0), values(n, 4, 0.05));
        let m0 = values(n, 5, 0.01);
        let v0: Vec<f32> = values(n, 6, 0.01).iter().map(|x| x * x).collect();
        let state = encode(&m0, &v0, &Device::Cpu)?;
        let (md, vd) = decode(&state, n)?;

        let pt = Tensor::from_slice(&p, (20, 30), &Device::Cpu)?;
        let gt = Tensor::from_slice(&g, (20, 30), &Device::Cpu)?;
        let (new_p, new_state) = adamw8_step(&pt, &gt, &state, s)?;

        let (mut pe, mut me, mut ve) = (p.clone(), md, vd);
        super::super::adamw_update(&mut pe, &g, &mut me, &mut ve, s);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&new_p.flatten_all()?.to_vec1()?), bits(&pe));
        let expected = encode(&me, &ve, &Device::Cpu)?;
        assert_eq!(new_state.to_vec1::<u8>()?, expected.to_vec1::<u8>()?);
        Ok(())
    }

    #[test]
    fn a_state_of_the_wrong_size_is_an_error() -> Result<()> {
        let s = AdamWStep::new(1e-3, 0.9, 0.999, 1e-8, 0.0, 1);
        let p = Tensor::zeros(300, DType::F32, &Device::Cpu)?;
        let e = adamw8_step(&p, &p, &zeros(290, &Device::Cpu)?, s).unwrap_err();
        assert!(e.to_string().contains("u8 [616]"), "{e}");
        Ok(())
    }
}
