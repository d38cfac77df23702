//! A frozen linear layer whose weight stays in bitsandbytes' 4-bit NormalFloat (NF4) format.
//!
//! Layout (as bitsandbytes stores it): the `[rows, cols]` weight is flattened row-major and cut
//! into blocks of `blocksize` elements; each element is a 4-bit index into a 16-value code book
//! scaled by its block's absmax; two indices per byte, the first element in the high nibble.
//! The block absmax values are either plain f32 or themselves 8-bit quantized ("double
//! quantization", see [`Absmax::Nested`]).
//!
//! The forward dequantizes a tile of rows at a time into a small buffer and runs a blocked
//! matmul on it, so no layer is ever held dense; the backward does the same for the input
//! gradient `dx = dy · W` and computes nothing for the frozen weight.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor, D};
use rayon::prelude::*;

/// bitsandbytes' NF4 code book (`create_normal_map(offset=0.9677083, use_extra_value=True)`).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The per-block scales of an NF4 matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// Double quantization: `absmax[b] = code_map[codes[b]] * nested_absmax[b / nested_blocksize] + offset`
    /// (f32, multiply then add, as bitsandbytes computes it).
    Nested {
        codes: Vec<u8>,
        /// The 256-entry signed dynamic map.
        code_map: Vec<f32>,
        nested_absmax: Vec<f32>,
        nested_blocksize: usize,
        offset: f32,
    },
}

impl Absmax {
    /// Number of blocks described.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested { codes, .. } => codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absmax of block `b` (callers keep `b < len()`).
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Nested {
                codes,
                code_map,
                nested_absmax,
                nested_blocksize,
                offset,
            } => code_map[codes[b] as usize] * nested_absmax[b / nested_blocksize] + offset,
        }
    }

    /// Every block's absmax as f32.
    pub fn decode(&self) -> Vec<f32> {
        self.decode_range(0..self.len())
    }

    /// The absmax of blocks `range` (within `0..len()`), the same values as [`get`](Self::get)
    /// without its division per block: decoding reads a row's scales this way per token.
    pub fn decode_range(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = vec![0f32; range.len()];
        self.decode_range_into(range.start, &mut out);
        out
    }

    /// [`decode_range`](Self::decode_range) of the blocks `first..first + out.len()` into
    /// `out` (decoding's tasks reuse one buffer per thread: a fresh one per task made two
    /// threads contend for the allocator's lock).
    pub fn decode_range_into(&self, first: usize, out: &mut [f32]) {
        let range = first..first + out.len();
        match self {
            Absmax::Plain(v) => out.copy_from_slice(&v[range]),
            Absmax::Nested {
                codes,
                code_map,
                nested_absmax,
                nested_blocksize,
                offset,
            } => {
                let mut b = range.start;
                while b < range.end {
                    let group = b / nested_blocksize;
                    let end = ((group + 1) * nested_blocksize).min(range.end);
                    let nested = nested_absmax[group];
                    for (o, &c) in out[b - first..end - first].iter_mut().zip(&codes[b..end]) {
                        *o = code_map[c as usize] * nested + offset;
                    }
                    b = end;
                }
            }
        }
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len() * 4,
            Absmax::Nested {
                codes,
                code_map,
                nested_absmax,
                ..
            } => codes.len() + 4 * (code_map.len() + nested_absmax.len()),
        }
    }

    fn check(&self) -> Result<()> {
        if let Absmax::Nested {
            codes,
            code_map,
            nested_absmax,
            nested_blocksize,
            ..
        } = self
        {
            if code_map.len() != 256 {
                candle_core::bail!(
                    "nf4: the nested code map has {} entries, expected 256",
                    code_map.len()
                )
            }
            if *nested_blocksize == 0
                || nested_absmax.len() != codes.len().div_ceil(*nested_blocksize)
            {
                candle_core::bail!(
                    "nf4: {} nested absmax values for {} codes in blocks of {nested_blocksize}",
                    nested_absmax.len(),
                    codes.len()
                )
            }
        }
        Ok(())
    }
}

/// An NF4-quantized `[rows, cols]` matrix.
#[derive(Debug)]
pub struct Nf4Matrix {
    /// U8, `ceil(rows * cols / 2)` bytes, on the matrix's device.
    packed: Tensor,
    /// The block scales on the host (small: one byte or one f32 per 64 elements).
    absmax: Absmax,
    /// The code book and scales on the packed data's device when that is not the CPU.
    device_scales: Option<DeviceScales>,
    code: [f32; 16],
    blocksize: usize,
    rows: usize,
    cols: usize,
}

impl Nf4Matrix {
    /// Checks that the pieces describe the same matrix.
    pub fn new(
        packed: Tensor,
        absmax: Absmax,
        code: [f32; 16],
        blocksize: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let n = rows * cols;
        if packed.dtype() != DType::U8 {
            candle_core::bail!(
                "nf4: packed data must be a u8 tensor, got {:?}",
                packed.dtype()
            )
        }
        if !blocksize.is_multiple_of(2) {
            candle_core::bail!("nf4: the block size must be even, got {blocksize}")
        }
        if packed.elem_count() != n.div_ceil(2) {
            candle_core::bail!(
                "nf4: {} packed bytes for a [{rows}, {cols}] matrix, expected {}",
                packed.elem_count(),
                n.div_ceil(2)
            )
        }
        if blocksize == 0 || absmax.len() != n.div_ceil(blocksize) {
            candle_core::bail!(
                "nf4: {} absmax values for {n} elements in blocks of {blocksize}, expected {}",
                absmax.len(),
                n.div_ceil(blocksize.max(1))
            )
        }
        absmax.check()?;
        let device_scales = if packed.device().is_cpu() {
            None
        } else {
            Some(DeviceScales::upload(&absmax, &code, packed.device())?)
        };
        Ok(Nf4Matrix {
            packed: packed.flatten_all()?.contiguous()?,
            absmax,
            device_scales,
            code,
            blocksize,
            rows,
            cols,
        })
    }

    /// The same matrix with its codes and scales on `device` (a copy; the packed bytes move
    /// as they are, nothing is dequantized).
    pub fn to_device(&self, device: &Device) -> Result<Nf4Matrix> {
        Nf4Matrix::new(
            self.packed.to_device(device)?,
            self.absmax.clone(),
            self.code,
            self.blocksize,
            self.rows,
            self.cols,
        )
    }

    /// The device the packed codes live on.
    pub fn device(&self) -> &Device {
        self.packed.device()
    }

    /// The whole matrix as a dense `[rows, cols]` tensor of `dtype` on the matrix's device
    /// (computed in f32 and rounded once, as bitsandbytes' `dequantize_4bit`).
    pub fn dequantize_to(&self, dtype: DType) -> Result<Tensor> {
        match &self.device_scales {
            None => self.dequantize()?.to_dtype(dtype),
            Some(scales) => self
                .packed
                .apply_op1_no_bwd(&DequantizeOnDevice {
                    matrix: self,
                    scales,
                    dtype,
                })?
                .reshape((self.rows, self.cols)),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    pub fn code(&self) -> &[f32; 16] {
        &self.code
    }

    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// The packed bytes as a flat u8 tensor.
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// Bytes held (codes and scales).
    pub fn size_in_bytes(&self) -> usize {
        self.packed.elem_count() + self.absmax.size_in_bytes()
    }

    fn with_packed<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let (storage, layout) = self.packed.storage_and_layout();
        let Storage::Cpu(CpuStorage::U8(bytes)) = &*storage else {
            candle_core::bail!("nf4: packed data is not a CPU u8 tensor")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("nf4: packed data is not contiguous")
        };
        Ok(f(&bytes[start..end]))
    }

    /// Rows `r0..r0 + out.len() / cols` dequantized into `out` (f32).
    pub fn dequantize_rows_into(&self, r0: usize, out: &mut [f32]) -> Result<()> {
        self.with_packed(|p| self.dequantize_parallel(p, r0 * self.cols, out))
    }

    /// The whole matrix as a dense f32 `[rows, cols]` tensor (bit-exact with bitsandbytes'
    /// `dequantize_4bit` in float32).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows_into(0, &mut out)?;
        Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)
    }

    fn dequantize_parallel(&self, packed: &[u8], start: usize, out: &mut [f32]) {
        // 16K elements per task amortise rayon's task cost; any start works for `dequantize_range`.
        const CHUNK: usize = 16_384;
        if out.len() <= CHUNK {
            return self.dequantize_range(packed, start, out);
        }
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, o)| self.dequantize_range(packed, start + i * CHUNK, o));
    }

    /// Flat elements `start..start + out.len()`: `code[nibble] * absmax[block]` (f32).
    fn dequantize_range(&self, packed: &[u8], start: usize, out: &mut [f32]) {
        let bs = self.blocksize;
        let end = start + out.len();
        let mut f = start;
        while f < end {
            let b = f / bs;
            let block_end = ((b + 1) * bs).min(end);
            let s = self.absmax.get(b);
            // Same f32 product per element as `code[q] * absmax`, computed 16 times per block.
            let table = self.code.map(|c| c * s);
            let o = &mut out[f - start..block_end - start];
            let mut i = 0;
            let mut g = f;
            if g % 2 == 1 {
                o[0] = table[(packed[g / 2] & 15) as usize];
                i = 1;
                g += 1;
            }
            let pairs = (block_end - g) / 2;
            for (pair, &byte) in o[i..i + 2 * pairs]
                .chunks_exact_mut(2)
                .zip(&packed[g / 2..g / 2 + pairs])
            {
                pair[0] = table[(byte >> 4) as usize];
                pair[1] = table[(byte & 15) as usize];
            }
            g += 2 * pairs;
            if g < block_end {
                o[block_end - f - 1] = table[(packed[g / 2] >> 4) as usize];
            }
            f = block_end;
        }
    }

    /// Rows per dequantized tile: about 4 MB of f32, a cache-friendly operand for the matmul.
    fn tile_rows(&self) -> usize {
        ((1 << 20) / self.cols.max(1)).clamp(16, self.rows.max(16))
    }

    /// `y [m, rows] = x [m, cols] · Wᵀ`.
    fn forward_cpu(&self, packed: &[u8], x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        if m == 0 || n == 0 || k == 0 {
            return vec![0f32; m * n];
        }
        if m <= crate::nf4_matvec::MAX_INPUT_ROWS && crate::nf4_matvec::fits(self.blocksize, k) {
            return self.forward_rows(packed, x, m);
        }
        if m <= GEMV_MAX_ROWS {
            return self.forward_gemv(packed, x, m);
        }
        let mut y = vec![0f32; m * n];
        let tn = self.tile_rows();
        let mut tile = vec![0f32; tn * k];
        for r0 in (0..n).step_by(tn) {
            let rows = tn.min(n - r0);
            let tile = &mut tile[..rows * k];
            self.dequantize_parallel(packed, r0 * k, tile);
            // SAFETY: dst covers columns r0..r0+rows of y (m × n, row stride n); lhs is x
            // (m × k); rhs is the tile transposed (k × rows, column stride k). All in bounds.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    y.as_mut_ptr().add(r0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    tile.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                )
            }
        }
        y
    }

    /// Few input rows (decoding, batched generation) when rows are whole blocks of 32: the
    /// row kernel of [`crate::nf4_matvec`] multiplies the packed codes directly, each task a
    /// range of weight rows with their block scales decoded first.
    fn forward_rows(&self, packed: &[u8], x: &[f32], m: usize) -> Vec<f32> {
        use crate::nf4_matvec::{rows, Isa, SplitInput};
        let (n, k) = (self.rows, self.cols);
        let (half, blocks) = (k / 2, k / self.blocksize);
        let split = SplitInput::new(x, m, k);
        let isa = Isa::detect();
        thread_local! {
            static SCALES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        crate::ggml_matvec::rows_times(m, n, |r0, out| {
            let count = out.len() / m;
            let codes = &packed[r0 * half..(r0 + count) * half];
            SCALES.with_borrow_mut(|scales| {
                // `rows` runs no parallel loop, so nothing re-enters this borrow.
                scales.resize(count * blocks, 0.0);
                self.absmax.decode_range_into(r0 * blocks, scales);
                rows(isa, &self.code, self.blocksize, codes, scales, &split, out);
            })
        })
    }

    /// Few input rows of a matrix whose rows are not whole blocks of 32: each task
    /// dequantizes one weight row at a time and dots it with every input row; nothing larger
    /// than a row is materialised.
    fn forward_gemv(&self, packed: &[u8], x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let rows_per_task = (16_384 / k.max(1)).max(1);
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(task, out)| {
                let mut row = vec![0f32; k];
                for (i, o) in out.chunks_exact_mut(m).enumerate() {
                    let r = task * rows_per_task + i;
                    self.dequantize_range(packed, r * k, &mut row);
                    for (t, ot) in o.iter_mut().enumerate() {
                        *ot = dot(&row, &x[t * k..(t + 1) * k]);
                    }
                }
            });
        let mut y = vec![0f32; m * n];
        for (r, col) in yt.chunks_exact(m).enumerate() {
            for (t, v) in col.iter().enumerate() {
                y[t * n + r] = *v;
            }
        }
        y
    }

    /// `dx [m, cols] = dy [m, rows] · W`, accumulated tile by tile.
    fn input_grad_cpu(&self, packed: &[u8], dy: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let mut dx = vec![0f32; m * k];
        if m == 0 || n == 0 || k == 0 {
            return dx;
        }
        let tn = self.tile_rows();
        let mut tile = vec![0f32; tn * k];
        for r0 in (0..n).step_by(tn) {
            let rows = tn.min(n - r0);
            let tile = &mut tile[..rows * k];
            self.dequantize_parallel(packed, r0 * k, tile);
            // SAFETY: dst is dx (m × k); lhs is columns r0..r0+rows of dy (m × n, row stride
            // n); rhs is the tile (rows × k). All in bounds.
            unsafe {
                gemm::gemm(
                    m,
                    k,
                    rows,
                    dx.as_mut_ptr(),
                    1,
                    k as isize,
                    r0 > 0,
                    dy.as_ptr().add(r0),
                    1,
                    n as isize,
                    tile.as_ptr(),
                    1,
                    k as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                )
            }
        }
        dx
    }
}

/// Input rows up to which the forward takes the row-by-row path.
const GEMV_MAX_ROWS: usize = 4;

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorise.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `y = x · Wᵀ` for `x: [.., cols]` (any float dtype, computed in f32) with an NF4 weight;
/// the result is f32 `[.., rows]`. Its backward returns the input gradient only.
pub fn nf4_linear(x: &Tensor, w: &Arc<Nf4Matrix>) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    if k != w.cols {
        candle_core::bail!(
            "nf4 linear: input has {k} features, the weight expects {}",
            w.cols
        )
    }
    if !x.device().same_device(w.device()) {
        candle_core::bail!(
            "nf4 linear: the input is on {:?}, the weight on {:?}",
            x.device(),
            w.device()
        )
    }
    let m = x.elem_count() / k.max(1);
    if !x.device().is_cpu() || m >= crate::GEMM_MIN_ROWS {
        return nf4_linear_dequantized(x, w);
    }
    let x = x.to_dtype(DType::F32)?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1 checked by dim") = w.rows;
    let xs = x.detach().flatten_all()?.to_vec1::<f32>()?;
    let y = w.with_packed(|p| w.forward_cpu(p, &xs, m))?;
    let y = Tensor::from_vec(y, out_dims, &Device::Cpu)?;
    let w = Arc::clone(w);
    crate::frozen::reattach(&x, y, move |g| {
        let mut in_dims = g.dims().to_vec();
        *in_dims.last_mut().expect("rank >= 1") = w.cols;
        let m = g.elem_count() / w.rows.max(1);
        let gs = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let dx = w.with_packed(|p| w.input_grad_cpu(p, &gs, m))?;
        Tensor::from_vec(dx, in_dims, &Device::Cpu)?.to_dtype(g.dtype())
    })
}

/// `nf4_linear` for GPUs and large batches: the layer is dequantized into a transient dense
/// weight of `x`'s dtype and multiplied by the device's GEMM (cuBLAS, gemm); the backward
/// dequantizes it again rather than keeping it, so only one layer is ever dense (the QLoRA
/// trade: a cheap dequantize against 4x memory).
fn nf4_linear_dequantized(x: &Tensor, w: &Arc<Nf4Matrix>) -> Result<Tensor> {
    let dense = w.dequantize_to(x.dtype())?;
    let y = crate::frozen::matmul_t(&x.detach(), &dense)?;
    drop(dense);
    let w = Arc::clone(w);
    crate::frozen::reattach(x, y, move |g| {
        let mut in_dims = g.dims().to_vec();
        *in_dims.last_mut().expect("rank >= 1") = w.cols;
        let dense = w.dequantize_to(g.dtype())?;
        g.reshape(((), w.rows))?.matmul(&dense)?.reshape(in_dims)
    })
}

/// The code book and block scales of an NF4 matrix on a non-CPU device.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct DeviceScales {
    code: Tensor,
    absmax: DeviceAbsmax,
}

#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum DeviceAbsmax {
    Plain(Tensor),
    Nested {
        codes: Tensor,
        map: Tensor,
        nested: Tensor,
        nested_blocksize: usize,
        offset: f32,
    },
}

impl DeviceScales {
    fn upload(absmax: &Absmax, code: &[f32; 16], device: &Device) -> Result<Self> {
        let absmax = match absmax {
            Absmax::Plain(v) => DeviceAbsmax::Plain(Tensor::new(v.as_slice(), device)?),
            Absmax::Nested {
                codes,
                code_map,
                nested_absmax,
                nested_blocksize,
                offset,
            } => DeviceAbsmax::Nested {
                codes: Tensor::new(codes.as_slice(), device)?,
                map: Tensor::new(code_map.as_slice(), device)?,
                nested: Tensor::new(nested_absmax.as_slice(), device)?,
                nested_blocksize: *nested_blocksize,
                offset: *offset,
            },
        };
        Ok(DeviceScales {
            code: Tensor::new(code.as_slice(), device)?,
            absmax,
        })
    }
}

/// Dequantizes the packed codes (the op's input) with the scales it holds.
struct DequantizeOnDevice<'a> {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    matrix: &'a Nf4Matrix,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    scales: &'a DeviceScales,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    dtype: DType,
}

impl candle_core::CustomOp1 for DequantizeOnDevice<'_> {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        candle_core::bail!("nf4: the device dequantize ran on the CPU (use Nf4Matrix::dequantize)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        packed: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use crate::cuda::Nf4DeviceScales;
        fn cuda(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, candle_core::Layout)> {
            let (s, l) = t.storage_and_layout();
            if !matches!(&*s, Storage::Cuda(_)) {
                candle_core::bail!("nf4: the scales are not on the CUDA device")
            }
            Ok((s, l.clone()))
        }
        fn storage<'a>(s: &'a candle_core::StorageRef<'_>) -> &'a candle_core::CudaStorage {
            match &**s {
                Storage::Cuda(c) => c,
                _ => unreachable!("checked by cuda()"),
            }
        }
        let m = self.matrix;
        let n = m.rows * m.cols;
        let code = cuda(&self.scales.code)?;
        let out = match &self.scales.absmax {
            DeviceAbsmax::Plain(a) => {
                let a = cuda(a)?;
                crate::cuda::nf4_dequantize(
                    (packed, layout),
                    (storage(&code.0), &code.1),
                    &Nf4DeviceScales::Plain(storage(&a.0), &a.1),
                    m.blocksize,
                    n,
                    self.dtype,
                )?
            }
            DeviceAbsmax::Nested {
                codes,
                map,
                nested,
                nested_blocksize,
                offset,
            } => {
                let (c, mp, ns) = (cuda(codes)?, cuda(map)?, cuda(nested)?);
                crate::cuda::nf4_dequantize(
                    (packed, layout),
                    (storage(&code.0), &code.1),
                    &Nf4DeviceScales::Nested {
                        codes: (storage(&c.0), &c.1),
                        map: (storage(&mp.0), &mp.1),
                        nested: (storage(&ns.0), &ns.1),
                        nested_blocksize: *nested_blocksize,
                        offset: *offset,
                    },
                    m.blocksize,
                    n,
                    self.dtype,
                )?
            }
        };
        Ok((out, candle_core::Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn random_matrix(rows: usize, cols: usize, nested: bool, seed: u64) -> Nf4Matrix {
        let n = rows * cols;
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| next() as u8).collect();
        let blocks = n.div_ceil(64);
        let absmax = if nested {
            Absmax::Nested {
                codes: (0..blocks).map(|_| next() as u8).collect(),
                code_map: (0..256).map(|i| (i as f32 - 128.0) / 128.0).collect(),
                nested_absmax: (0..blocks.div_ceil(256))
                    .map(|i| 0.01 + i as f32 * 0.001)
                    .collect(),
                nested_blocksize: 256,
                offset: 0.05,
            }
        } else {
            Absmax::Plain((0..blocks).map(|_| (next() % 1000) as f32 / 1e4).collect())
        };
        let packed = Tensor::from_vec(packed, n.div_ceil(2), &Device::Cpu).unwrap();
        Nf4Matrix::new(packed, absmax, NF4_CODE, 64, rows, cols).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn forward_and_input_gradient_match_the_dense_weight() -> Result<()> {
        // cols = 160 makes blocks straddle rows, as in the tiny model's down_proj; 37 rows
        // leave a partial tile; m = 3 takes the row-by-row path and m = 2·9 the tiled one.
        for (rows, cols, nested) in [(37, 160, false), (300, 64, true), (64, 96, true)] {
            let w = Arc::new(random_matrix(rows, cols, nested, rows as u64));
            let dense = w.dequantize()?;
            for shape in [(1, 3, cols), (2, 9, cols)] {
                let x = Var::randn(0f32, 1., shape, &Device::Cpu)?;
                let y = nf4_linear(x.as_tensor(), &w)?;
                let reference = x.as_tensor().broadcast_matmul(&dense.t()?)?;
                assert!(
                    max_diff(&y, &reference) < 1e-4,
                    "forward {rows}x{cols} {shape:?}"
                );
                let c = Tensor::randn(0f32, 1., y.shape(), &Device::Cpu)?;
                let grads = (&y * &c)?.sum_all()?.backward()?;
                let dx = grads.get(x.as_tensor()).expect("gradient reaches x");
                let expected = c.broadcast_matmul(&dense)?;
                assert!(max_diff(dx, &expected) < 1e-4, "dx {rows}x{cols} {shape:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn empty_inputs_give_empty_outputs() -> Result<()> {
        let w = Arc::new(random_matrix(8, 64, true, 3));
        let x = Var::zeros((0, 64), DType::F32, &Device::Cpu)?;
        let y = nf4_linear(x.as_tensor(), &w)?;
        assert_eq!(y.dims(), &[0, 8]);
        assert!(nf4_linear(&Tensor::zeros((2, 63), DType::F32, &Device::Cpu)?, &w).is_err());
        Ok(())
    }

    #[test]
    fn dequantize_reads_high_nibble_first() -> Result<()> {
        let packed = Tensor::new(&[0x0Fu8, 0x7A], &Device::Cpu)?;
        let m = Nf4Matrix::new(packed, Absmax::Plain(vec![2.0]), NF4_CODE, 64, 1, 4)?;
        let v = m.dequantize()?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(v, vec![-2.0, 2.0, 0.0, NF4_CODE[10] * 2.0]);
        Ok(())
    }
}
