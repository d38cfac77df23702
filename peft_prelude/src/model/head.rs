//! The frozen output head as a fused loss reads it: its dense weight, and over a quantized
//! base the same weight held for the integer GEMM.
//!
//! Training over an NF4 or GGUF base runs the layers' frozen products on 8-bit integers
//! (`peft_kernels::q8_gemm`); the head stays a dense f32 matrix (QLoRA never quantizes it), and
//! its two products per token (the logits and the softmax-weighted sum of its rows, 113 of the
//! SmolLM2 step's ~170 MFLOP of f32 work per token) were then the largest f32 cost left. With
//! the base already on integer products, the head takes them too: 8-bit blocks of 64 (finer
//! than the base's 4-bit codes), built once per head and kept.

use std::sync::{Arc, Mutex, Weak};

use candle_core::{DType, Tensor, TensorId};
use peft_kernels::cross_entropy::Int8Head;

use super::linear::FrozenWeight;
use crate::quant::QuantizedWeight;

/// The head of a fused loss.
#[derive(Debug, Clone)]
pub struct FrozenHead {
    /// `[vocab, hidden]` in the model's dtype (a quantized head dequantized, transiently).
    pub weight: Tensor,
    /// The same weight on integer products, when the base trains on them.
    pub int8: Option<Arc<Int8Head>>,
}

/// Which head weight the kept products were built from.
#[derive(Debug)]
enum Source {
    Dense(TensorId),
    Quantized(Weak<dyn QuantizedWeight>),
}

impl Source {
    fn is(&self, weight: &FrozenWeight) -> bool {
        match (self, weight) {
            (Source::Dense(id), FrozenWeight::Dense(w)) => *id == w.id(),
            (Source::Quantized(q), FrozenWeight::Quantized(w)) => {
                std::ptr::addr_eq(q.as_ptr(), Arc::as_ptr(w))
            }
            _ => false,
        }
    }
}

/// The head's integer products, built at the first loss that wants them and kept until the
/// head changes or the base stops training on integer products.
#[derive(Debug, Default)]
pub(crate) struct Int8HeadCache(Mutex<Option<(Source, Arc<Int8Head>)>>);

impl Int8HeadCache {
    /// The products for `head` (whose dense values are `dense`), or `None` where they do not
    /// apply: `wanted` false (a dense base, or integer products off or slower on this CPU),
    /// not f32 on the CPU, or a shape out of whole blocks (kept products are then dropped);
    /// or not `training` (kept products stay for the next training batch).
    pub(crate) fn products(
        &self,
        head: &FrozenWeight,
        dense: &Tensor,
        wanted: bool,
        training: bool,
    ) -> Option<Arc<Int8Head>> {
        let mut kept = self.0.lock().expect("not poisoned");
        let (vocab, hidden) = dense.dims2().ok()?;
        if !(wanted
            && dense.dtype() == DType::F32
            && dense.device().is_cpu()
            && Int8Head::fits(vocab, hidden))
        {
            *kept = None;
            return None;
        }
        if !training {
            return None;
        }
        if let Some((source, products)) = kept.as_ref() {
            if source.is(head) {
                return Some(Arc::clone(products));
            }
        }
        // Another head's products go first, not after the new ones are built.
        *kept = None;
        // A head that cannot be read keeps the f32 path, which reports the error.
        let values = dense.flatten_all().ok()?.to_vec1::<f32>().ok()?;
        let products = Arc::new(Int8Head::new(&values, vocab, hidden).ok()?);
        let source = match head {
            FrozenWeight::Dense(w) => Source::Dense(w.id()),
            FrozenWeight::Quantized(q) => Source::Quantized(Arc::downgrade(q)),
        };
        *kept = Some((source, Arc::clone(&products)));
        Some(products)
    }

    /// Whether products are kept.
    pub(crate) fn holds(&self) -> bool {
        self.0.lock().expect("not poisoned").is_some()
    }

    /// Drops the kept products (rebuilt by the next loss that wants them).
    pub(crate) fn release(&self) {
        *self.0.lock().expect("not poisoned") = None;
    }
}
