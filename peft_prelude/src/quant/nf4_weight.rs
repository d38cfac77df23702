//! An NF4 projection: the packed codes and block scales of bitsandbytes' format, multiplied
//! by the kernel in `peft_kernels::nf4` without ever holding the layer dense.

use std::any::Any;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_kernels::nf4::{nf4_linear, Absmax, Nf4Matrix, NF4_CODE};

use super::nf4::{double_quantize, quantize_blocks, BLOCKSIZE, NESTED_BLOCKSIZE};
use super::QuantizedWeight;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Nf4Weight {
    matrix: Arc<Nf4Matrix>,
    /// The dtype outputs are produced in (bitsandbytes' `quant_state.dtype`).
    dtype: DType,
}

impl Nf4Weight {
    /// Quantizes a dense `[out, in]` weight as bitsandbytes' `quantize_4bit(w, 64, "nf4",
    /// compress_statistics=double_quant)` does; outputs will be in `w`'s dtype, and the
    /// result lives on `w`'s device (the quantization itself runs on the CPU).
    pub fn quantize(w: &Tensor, double_quant: bool) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (packed, absmax) = quantize_blocks(&data, BLOCKSIZE);
        drop(data);
        let absmax = if double_quant {
            double_quantize(&absmax, NESTED_BLOCKSIZE)
        } else {
            Absmax::Plain(absmax)
        };
        let n = packed.len();
        let packed = Tensor::from_vec(packed, n, &Device::Cpu)?;
        let mut matrix = Nf4Matrix::new(packed, absmax, NF4_CODE, BLOCKSIZE, rows, cols)?;
        if !w.device().is_cpu() {
            matrix = matrix.to_device(w.device())?;
        }
        Ok(Nf4Weight {
            matrix: Arc::new(matrix),
            dtype: w.dtype(),
        })
    }

    pub fn from_matrix(matrix: Nf4Matrix, dtype: DType) -> Self {
        Nf4Weight {
            matrix: Arc::new(matrix),
            dtype,
        }
    }

    pub fn matrix(&self) -> &Nf4Matrix {
        &self.matrix
    }

    /// The same weight with its codes and scales on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Nf4Weight {
            matrix: Arc::new(self.matrix.to_device(device)?),
            dtype: self.dtype,
        })
    }

    pub fn is_double_quant(&self) -> bool {
        matches!(self.matrix.absmax(), Absmax::Nested { .. })
    }
}

impl QuantizedWeight for Nf4Weight {
    fn shape(&self) -> (usize, usize) {
        (self.matrix.rows(), self.matrix.cols())
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> Device {
        self.matrix.device().clone()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(nf4_linear(x, &self.matrix)?.to_dtype(self.dtype)?)
    }

    fn dequantize(&self) -> Result<Tensor> {
        Ok(self.matrix.dequantize_to(self.dtype)?)
    }

    fn requantize(&self, dense: &Tensor) -> Result<Arc<dyn QuantizedWeight>> {
        if dense.dims2()? != self.shape() {
            return Err(Error::InvalidArgument(format!(
                "new weight has shape {:?}, the NF4 layer's is {:?}",
                dense.dims(),
                self.shape()
            )));
        }
        let mut q = Nf4Weight::quantize(dense, self.is_double_quant())?;
        q.dtype = self.dtype;
        Ok(Arc::new(q))
    }

    fn handle(&self) -> &Tensor {
        self.matrix.packed()
    }

    fn size_in_bytes(&self) -> usize {
        self.matrix.size_in_bytes()
    }

    fn format(&self) -> String {
        if self.is_double_quant() {
            "nf4 (double quant)".into()
        } else {
            "nf4".into()
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
