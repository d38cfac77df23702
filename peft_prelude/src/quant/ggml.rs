//! A GGUF tensor (Q4_0, Q4_1, Q4_K, Q8_0 …) kept quantized as a frozen projection.
//!
//! For a few rows (decoding) the forward reads the packed blocks directly: our kernels for
//! Q4_0/Q4_1/Q5_0/Q8_0 and Q4_K/Q6_K (f32 activations rounded to 8 bits per 32, as GGML
//! does), candle's quantized matmul for the other types (which
//! quantizes the activations to Q8 inside, so results differ slightly from a dense matmul of
//! the dequantized weight); for batches (training, prefill) the layer is dequantized transiently and multiplied
//! by the f32 GEMM. The backward dequantizes the layer transiently for `dx = dy · W` and
//! computes nothing for `W`.

use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor, D};
use peft_kernels::ggml_matvec::BlockFormat;
use peft_kernels::ggml_tiles::TiledBlocks;
use peft_kernels::kquant_matvec::SuperFormat;

use super::QuantizedWeight;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct GgmlWeight {
    packed: Packed,
    ggml_dtype: GgmlDType,
    /// `(out, in)`.
    shape: (usize, usize),
    /// Outputs are produced in this dtype.
    dtype: DType,
    /// An empty tensor standing for the data (QTensor is not a candle `Tensor`).
    handle: Tensor,
}

/// Where the codes live. One form only, so a kept model costs its file's size once.
#[derive(Debug, Clone)]
enum Packed {
    /// GGML's own layout, in candle's `QTensor`.
    Blocks(Arc<QTensor>),
    /// Q4_0/Q4_1/Q8_0 regrouped 16 rows at a time for the AVX-512 VNNI decoding kernel, on
    /// CPUs that have it (decoding's weight reads take a third of the instructions).
    Tiles(Arc<TiledBlocks>),
}

impl GgmlWeight {
    /// `qtensor` of shape `[out, in]` (candle's order: rows are output features).
    pub fn new(qtensor: QTensor, dtype: DType) -> Result<Self> {
        let (out_f, in_f) = match qtensor.shape().dims() {
            &[o, i] => (o, i),
            dims => {
                return Err(Error::InvalidArgument(format!(
                    "a quantized projection must be 2-D, got shape {dims:?}"
                )))
            }
        };
        let device = qtensor.device();
        let ggml_dtype = qtensor.dtype();
        let tiled = block_format(ggml_dtype)
            .filter(|&f| device.is_cpu() && TiledBlocks::supports(f) && TiledBlocks::preferred());
        let packed = match tiled {
            Some(format) => {
                let tiles = TiledBlocks::from_blocks(format, &qtensor.data()?, out_f, in_f)
                    .map_err(|e| Error::InvalidArgument(format!("{ggml_dtype:?} layer: {e}")))?;
                Packed::Tiles(Arc::new(tiles))
            }
            None => Packed::Blocks(Arc::new(qtensor)),
        };
        let handle = Tensor::zeros(0, DType::U8, &device)?;
        Ok(GgmlWeight {
            packed,
            ggml_dtype,
            shape: (out_f, in_f),
            dtype,
            handle,
        })
    }

    /// The codes as candle's `QTensor` in GGML's layout (rebuilt from the tiles when the
    /// layer is kept tiled).
    pub fn qtensor(&self) -> Result<Arc<QTensor>> {
        match &self.packed {
            Packed::Blocks(q) => Ok(Arc::clone(q)),
            Packed::Tiles(t) => {
                let storage =
                    QStorage::from_data(Cow::Owned(t.to_blocks()), &Device::Cpu, self.ggml_dtype)?;
                Ok(Arc::new(QTensor::new(storage, self.shape)?))
            }
        }
    }

    /// Whether the layer is kept in the tiled layout of [`TiledBlocks`].
    pub fn is_tiled(&self) -> bool {
        matches!(self.packed, Packed::Tiles(_))
    }

    /// `y` (computed from `x32` without a graph) given the layer's input gradient as its
    /// backward: `dx = dy · W`, the layer dense only during its backward; nothing for `W`.
    fn with_backward(&self, x32: &Tensor, y: Tensor) -> Result<Tensor> {
        let (out_f, in_f) = self.shape;
        let this = self.clone();
        Ok(peft_kernels::frozen::reattach(x32, y, move |g| {
            let w = this
                .dense_f32(g.device())
                .map_err(candle_core::Error::wrap)?
                .to_dtype(g.dtype())?;
            let mut in_dims = g.dims().to_vec();
            *in_dims.last_mut().expect("rank >= 1") = in_f;
            g.reshape(((), out_f))?.matmul(&w)?.reshape(in_dims)
        })?)
    }

    /// The dense f32 weight `[out, in]` on `device`.
    fn dense_f32(&self, device: &Device) -> Result<Tensor> {
        match &self.packed {
            Packed::Blocks(q) => Ok(q.dequantize(device)?),
            Packed::Tiles(t) => Ok(
                Tensor::from_vec(t.dequantize(), self.shape, &Device::Cpu)?.to_device(device)?
            ),
        }
    }

    /// The formats our decoding kernel reads directly.
    pub fn block_format(&self) -> Option<BlockFormat> {
        block_format(self.ggml_dtype)
    }

    /// The super-block formats our decoding kernel reads directly.
    pub fn super_format(&self) -> Option<SuperFormat> {
        match self.ggml_dtype {
            GgmlDType::Q4K => Some(SuperFormat::Q4K),
            GgmlDType::Q6K => Some(SuperFormat::Q6K),
            _ => None,
        }
    }

    pub fn ggml_dtype(&self) -> GgmlDType {
        self.ggml_dtype
    }

    /// Undoes llama.cpp's q/k row permutation on the quantized rows directly (GGML blocks run
    /// along a row, so rows are independent byte ranges).
    pub fn unpermute_rows(q: &QTensor, heads: usize) -> Result<QTensor> {
        let (rows, cols) = q.shape().dims2()?;
        let dtype = q.dtype();
        if heads == 0 || rows % (2 * heads) != 0 || cols % dtype.block_size() != 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot un-permute a [{rows}, {cols}] {dtype:?} tensor for {heads} heads"
            )));
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let data = q.data()?;
        let half = rows / heads / 2;
        let mut out = Vec::with_capacity(data.len());
        // HF row (h, a, b) in (heads, 2, half) order is llama.cpp row (h, b, a) in (heads, half, 2).
        for h in 0..heads {
            for a in 0..2 {
                for b in 0..half {
                    let src = h * 2 * half + 2 * b + a;
                    out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
                }
            }
        }
        let storage = QStorage::from_data(Cow::Owned(out), &q.device(), dtype)?;
        Ok(QTensor::new(storage, (rows, cols))?)
    }
}

impl QuantizedWeight for GgmlWeight {
    fn shape(&self) -> (usize, usize) {
        self.shape
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> Device {
        self.handle.device().clone()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_f, in_f) = self.shape();
        if x.dim(D::Minus1)? != in_f {
            return Err(Error::InvalidArgument(format!(
                "input has {} features, the layer expects {in_f}",
                x.dim(D::Minus1)?
            )));
        }
        let x32 = x.to_dtype(DType::F32)?;
        let rows = x32.elem_count() / in_f.max(1);
        let y = if rows >= peft_kernels::GEMM_MIN_ROWS {
            // Training batches and prefill: dequantize the layer once and run one f32 GEMM,
            // which is many times faster than per-row integer dot products at this size (and
            // does not round the activations to Q8).
            let w = self.dense_f32(x32.device())?;
            peft_kernels::frozen::matmul_t(&x32.detach(), &w)?
        } else if let Packed::Tiles(tiles) = &self.packed {
            // Decoding on an AVX-512 VNNI CPU: 16 rows per instruction.
            let xs = x32.flatten_all()?.to_vec1::<f32>()?;
            let y = tiles
                .matmul_t(&xs, rows)
                .map_err(|e| Error::InvalidArgument(format!("{:?} layer: {e}", self.ggml_dtype)))?;
            Tensor::from_vec(y, out_dims(&x32, out_f)?, x32.device())?
        } else if let (Packed::Blocks(qtensor), true) = (
            &self.packed,
            x32.device().is_cpu()
                && (self.block_format().is_some() || self.super_format().is_some()),
        ) {
            // Decoding: our kernels stream the packed rows once.
            let xs = x32.flatten_all()?.to_vec1::<f32>()?;
            let data = qtensor.data()?;
            let y = match (self.block_format(), self.super_format()) {
                (Some(format), _) => {
                    peft_kernels::ggml_matvec::matmul_t(&xs, rows, in_f, &data, out_f, format)
                }
                (None, Some(format)) => {
                    peft_kernels::kquant_matvec::matmul_t(&xs, rows, in_f, &data, out_f, format)
                }
                (None, None) => unreachable!("checked above"),
            }
            .map_err(|e| Error::InvalidArgument(format!("{:?} layer: {e}", self.ggml_dtype)))?;
            Tensor::from_vec(y, out_dims(&x32, out_f)?, x32.device())?
        } else {
            // Other types: candle's integer-dot kernels on Q8 activations, never dense.
            x32.detach()
                .contiguous()?
                .apply_op1_no_bwd(self.qtensor()?.as_ref())?
        };
        let y = self.with_backward(&x32, y)?;
        Ok(y.to_dtype(self.dtype)?)
    }

    fn dequantize(&self) -> Result<Tensor> {
        Ok(self.dense_f32(&self.device())?.to_dtype(self.dtype)?)
    }

    fn requantize(&self, dense: &Tensor) -> Result<Arc<dyn QuantizedWeight>> {
        if dense.dims2()? != self.shape() {
            return Err(Error::InvalidArgument(format!(
                "new weight has shape {:?}, the layer's is {:?}",
                dense.dims(),
                self.shape()
            )));
        }
        let q = QTensor::quantize(&dense.to_dtype(DType::F32)?, self.ggml_dtype())?;
        Ok(Arc::new(GgmlWeight::new(q, self.dtype)?))
    }

    fn handle(&self) -> &Tensor {
        &self.handle
    }

    fn size_in_bytes(&self) -> usize {
        match &self.packed {
            Packed::Blocks(q) => q.storage_size_in_bytes(),
            Packed::Tiles(t) => t.size_in_bytes(),
        }
    }

    fn format(&self) -> String {
        format!("{:?}", self.ggml_dtype())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The block formats of [`peft_kernels::ggml_matvec`] by GGML type.
fn block_format(dtype: GgmlDType) -> Option<BlockFormat> {
    match dtype {
        GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
        GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
        GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
        GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
        _ => None,
    }
}

/// `x`'s dims with the last replaced by `out_f`.
fn out_dims(x: &Tensor, out_f: usize) -> Result<Vec<usize>> {
    let mut d = x.dims().to_vec();
    *d.last_mut().ok_or_else(|| {
        Error::InvalidArgument("a projection's input needs at least one dimension".into())
    })? = out_f;
    Ok(d)
}

/// Decoding's projections that read the same input (a layer's q, k and v; gate and up) in
/// one parallel call, when every one is a plain frozen layer kept tiled (see
/// [`TiledBlocks::matmul_t_many`]); `None` when any is not (an adapter on it, another
/// format, a batch large enough for the GEMM), and the caller runs them one by one.
pub(crate) fn forward_together(
    layers: &[Box<dyn crate::model::Linear>],
    x: &Tensor,
) -> Result<Option<Vec<Tensor>>> {
    let in_f = x.dim(D::Minus1)?;
    let rows = x.elem_count() / in_f.max(1);
    if layers.len() < 2 || rows == 0 || rows >= peft_kernels::GEMM_MIN_ROWS || !x.device().is_cpu()
    {
        return Ok(None);
    }
    let mut parts = Vec::with_capacity(layers.len());
    for layer in layers {
        let Some(frozen) = layer.as_any().downcast_ref::<crate::model::FrozenLinear>() else {
            return Ok(None);
        };
        let Some(ggml) = frozen
            .quantized_weight()
            .and_then(|q| q.as_any().downcast_ref::<GgmlWeight>())
        else {
            return Ok(None);
        };
        let Packed::Tiles(tiles) = &ggml.packed else {
            return Ok(None);
        };
        if ggml.shape.1 != in_f {
            return Ok(None);
        }
        parts.push((frozen, ggml, tiles.as_ref()));
    }
    let x32 = x.to_dtype(DType::F32)?;
    let xs = x32.flatten_all()?.to_vec1::<f32>()?;
    let tiles: Vec<&TiledBlocks> = parts.iter().map(|p| p.2).collect();
    let ys = TiledBlocks::matmul_t_many(&tiles, &xs, rows)
        .map_err(|e| Error::InvalidArgument(format!("projections sharing an input: {e}")))?;
    parts
        .iter()
        .zip(ys)
        .map(|(&(frozen, ggml, _), y)| {
            let y = Tensor::from_vec(y, out_dims(&x32, ggml.shape.0)?, x32.device())?;
            let y = ggml.with_backward(&x32, y)?.to_dtype(ggml.dtype)?;
            Ok(match frozen.bias() {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
