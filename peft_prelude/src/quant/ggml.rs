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
use peft_kernels::kquant_matvec::SuperFormat;

use super::QuantizedWeight;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct GgmlWeight {
    qtensor: Arc<QTensor>,
    /// Outputs are produced in this dtype.
    dtype: DType,
    /// An empty tensor standing for the data (QTensor is not a candle `Tensor`).
    handle: Tensor,
}

impl GgmlWeight {
    /// `qtensor` of shape `[out, in]` (candle's order: rows are output features).
    pub fn new(qtensor: QTensor, dtype: DType) -> Result<Self> {
        if qtensor.shape().rank() != 2 {
            return Err(Error::InvalidArgument(format!(
                "a quantized projection must be 2-D, got shape {:?}",
                qtensor.shape().dims()
            )));
        }
        let handle = Tensor::zeros(0, DType::U8, &qtensor.device())?;
        Ok(GgmlWeight {
            qtensor: Arc::new(qtensor),
            dtype,
            handle,
        })
    }

    pub fn qtensor(&self) -> &QTensor {
        &self.qtensor
    }

    /// The formats our decoding kernel reads directly.
    pub fn block_format(&self) -> Option<BlockFormat> {
        match self.qtensor.dtype() {
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
            _ => None,
        }
    }

    /// The super-block formats our decoding kernel reads directly.
    pub fn super_format(&self) -> Option<SuperFormat> {
        match self.qtensor.dtype() {
            GgmlDType::Q4K => Some(SuperFormat::Q4K),
            GgmlDType::Q6K => Some(SuperFormat::Q6K),
            _ => None,
        }
    }

    pub fn ggml_dtype(&self) -> GgmlDType {
        self.qtensor.dtype()
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
        let d = self.qtensor.shape().dims();
        (d[0], d[1])
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> Device {
        self.qtensor.device()
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
            let w = self.qtensor.dequantize(x32.device())?;
            peft_kernels::frozen::matmul_t(&x32.detach(), &w)?
        } else if x32.device().is_cpu()
            && (self.block_format().is_some() || self.super_format().is_some())
        {
            // Decoding: our kernels stream the packed rows once.
            let (out_dims, xs) = {
                let mut d = x32.dims().to_vec();
                *d.last_mut().expect("rank >= 1") = out_f;
                (d, x32.flatten_all()?.to_vec1::<f32>()?)
            };
            let data = self.qtensor.data()?;
            let y = match (self.block_format(), self.super_format()) {
                (Some(format), _) => {
                    peft_kernels::ggml_matvec::matmul_t(&xs, rows, in_f, &data, out_f, format)
                }
                (None, Some(format)) => {
                    peft_kernels::kquant_matvec::matmul_t(&xs, rows, in_f, &data, out_f, format)
                }
                (None, None) => unreachable!("checked above"),
            }
            .map_err(|e| Error::InvalidArgument(format!("{:?} layer: {e}", self.ggml_dtype())))?;
            Tensor::from_vec(y, out_dims, x32.device())?
        } else {
            // Other types: candle's integer-dot kernels on Q8 activations, never dense.
            x32.detach()
                .contiguous()?
                .apply_op1_no_bwd(self.qtensor.as_ref())?
        };
        let q = Arc::clone(&self.qtensor);
        let y = peft_kernels::frozen::reattach(&x32, y, move |g| {
            // One layer dense at a time, only during its backward.
            let w = q.dequantize(g.device())?.to_dtype(g.dtype())?;
            let mut in_dims = g.dims().to_vec();
            *in_dims.last_mut().expect("rank >= 1") = in_f;
            g.reshape(((), out_f))?.matmul(&w)?.reshape(in_dims)
        })?;
        Ok(y.to_dtype(self.dtype)?)
    }

    fn dequantize(&self) -> Result<Tensor> {
        Ok(self
            .qtensor
            .dequantize(&self.qtensor.device())?
            .to_dtype(self.dtype)?)
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
        self.qtensor.storage_size_in_bytes()
    }

    fn format(&self) -> String {
        format!("{:?}", self.ggml_dtype())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
