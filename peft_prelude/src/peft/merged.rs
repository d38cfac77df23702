//! Unsloth's one-call saves of a fine-tuned model: `save_pretrained_merged` (the adapter
//! merged into 16-bit or 4-bit weights, or the adapter alone) and `save_pretrained_gguf`.
//!
//! Merging here never rounds through the base's own format: a quantized base (NF4, GGUF) is
//! dequantized, the adapter added in f32, and only then is the result written in the
//! export's precision. `merge_and_unload` on a 4-bit model re-quantizes the sum into NF4 (as
//! PEFT does), which can change the answers of a small model; a 16-bit merge is exact up to
//! the final 16-bit rounding. The model itself is not changed.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::config::PeftConfig;
use super::ia3::Ia3Linear;
use super::lora::LoraLinear;
use super::model::PeftModel;
use super::saved::{SavedEmbedding, SavedLinear};
use crate::error::{Error, Result};
use crate::quant::export::{
    gguf_file_in, write_bnb_4bit, write_gguf, write_hf_16bit, ExportSource, GgufExport,
};
use crate::tokenizer::Tokenizer;

/// What [`PeftModel::save_pretrained_merged`] writes (Unsloth's `save_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMethod {
    /// `"merged_16bit"`: a Hugging Face checkpoint with the adapter merged in full precision,
    /// stored in 16 bits (the model's dtype when it is 16-bit, else f16).
    Merged16bit,
    /// `"merged_4bit"`: merged, then quantized to NF4 with double quantization (a
    /// bitsandbytes checkpoint). For inference only: the 4-bit rounding of the sum can change
    /// answers, and training on it again stacks the error.
    Merged4bit,
    /// `"lora"`: the adapter alone, in PEFT's format, with the tokenizer.
    Lora,
}

impl SaveMethod {
    /// Unsloth's names: `merged_16bit`, `merged_4bit` (also `merged_4bit_forced`), `lora`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "merged_16bit" => Ok(SaveMethod::Merged16bit),
            "merged_4bit" | "merged_4bit_forced" => Ok(SaveMethod::Merged4bit),
            "lora" => Ok(SaveMethod::Lora),
            other => Err(Error::InvalidArgument(format!(
                "save_method `{other}` (supported: merged_16bit, merged_4bit, lora)"
            ))),
        }
    }
}

impl PeftModel {
    /// Saves the model for use elsewhere, as Unsloth's `save_pretrained_merged(dir, tokenizer,
    /// save_method)`: `"merged_16bit"` (a Hugging Face model directory that transformers and
    /// [`Pretrained`](crate::model::Pretrained) load: the active adapter merged in f32 over the
    /// dequantized base, stored in 16 bits), `"merged_4bit"` (the same merged weights
    /// quantized to NF4, a bitsandbytes checkpoint; prints Unsloth's warning) or `"lora"`
    /// (the adapter in PEFT's format). The tokenizer is written alongside in every case
    /// (`tokenizer.json`, `tokenizer_config.json` with the chat template).
    pub fn save_pretrained_merged(
        &self,
        dir: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        save_method: &str,
    ) -> Result<()> {
        let dir = dir.as_ref();
        match SaveMethod::from_name(save_method)? {
            SaveMethod::Lora => {
                self.save_pretrained(dir)?;
                tokenizer.save_pretrained(dir)
            }
            SaveMethod::Merged16bit => {
                let dtype = match self.model().dtype() {
                    DType::BF16 => DType::BF16,
                    _ => DType::F16,
                };
                write_hf_16bit(&self.merged_source()?, dir, dtype, tokenizer)
            }
            SaveMethod::Merged4bit => {
                eprintln!(
                    "Warning: merging into 4-bit weights is for inference only: the 4-bit rounding \
                     of the merged weights can change the model's answers. To merge without loss, \
                     use \"merged_16bit\"."
                );
                write_bnb_4bit(&self.merged_source()?, dir, tokenizer)
            }
        }
    }

    /// Saves the model as a GGUF for llama.cpp and Ollama, as Unsloth's
    /// `save_pretrained_gguf(dir, tokenizer, quantization_method)`: the active adapter merged
    /// in f32 over the dequantized base, then written as `"f16"`, `"q8_0"` or `"q4_k_m"`
    /// (llama.cpp's mix; Unsloth's aliases `not_quantized`, `fast_quantized`, `quantized`
    /// work too) into `dir/model.{TYPE}.gguf`, with the tokenizer and chat template in its
    /// metadata. Returns the file's path.
    pub fn save_pretrained_gguf(
        &self,
        dir: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        quantization_method: &str,
    ) -> Result<PathBuf> {
        let dir = dir.as_ref();
        let kind = GgufExport::from_name(quantization_method)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = gguf_file_in(dir, kind);
        write_gguf(&self.merged_source()?, &path, kind, tokenizer)?;
        Ok(path)
    }

    /// The base model's tensors with the active adapter merged in (f32, computed per
    /// projection when written). Prompt-learning and bottleneck adapters change the
    /// computation itself and have no merged form.
    pub fn merged_source(&self) -> Result<ExportSource<'_>> {
        let adapter = self.active_adapter();
        let enabled = self.adapters_enabled();
        if enabled {
            match self.peft_config(&adapter) {
                Some(PeftConfig::Lora(_) | PeftConfig::Ia3(_)) | None => {}
                Some(other) => {
                    return Err(Error::InvalidArgument(format!(
                        "{} adapters cannot be merged into the weights (only LORA and IA3); \
                         save the adapter with save_method \"lora\"",
                        other.peft_type()
                    )))
                }
            }
        }
        let model = self.model();
        let embed_tokens = match model
            .embed_override()
            .and_then(|o| o.as_any().downcast_ref::<SavedEmbedding>())
            .and_then(|e| e.copies.get(&adapter))
            .filter(|_| enabled)
        {
            Some(copy) => copy.as_tensor().detach().to_dtype(model.dtype())?,
            None => model.embed_tokens().clone(),
        };
        let linear = move |path: &str| -> Result<Tensor> {
            let layer = model.linear(path)?;
            let any = layer.as_any();
            if enabled {
                if let Some(l) = any.downcast_ref::<LoraLinear>() {
                    if l.adapters().contains_key(&adapter) {
                        return l.merged_weight(&adapter);
                    }
                }
                if let Some(l) = any.downcast_ref::<Ia3Linear>() {
                    if l.adapters().contains_key(&adapter) {
                        return l.merged_weight(&adapter);
                    }
                }
                if let Some(copy) = any
                    .downcast_ref::<SavedLinear>()
                    .and_then(|l| l.copy(&adapter))
                {
                    return Ok(copy.as_tensor().detach());
                }
            }
            layer.base().dense_weight()
        };
        Ok(ExportSource::with_weights(model, linear, embed_tokens))
    }
}
