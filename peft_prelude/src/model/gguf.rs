//! GGUF checkpoints as llama.cpp's converter writes them (`llama` for Mistral and Llama,
//! `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3`): metadata → [`ModelConfig`], tensors by GGUF
//! name → Hugging Face names, with the converter's changes undone (the `llama` architecture's
//! q/k row permutation, Gemma's `1 +` on norms) so that the weights (and adapters trained on
//! them) are in HF order and convention.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};

use std::sync::Arc;

use super::config::ModelConfig;
use super::weights::WeightSource;
use crate::error::{Error, Result};
use crate::quant::{GgmlWeight, Quantization, QuantizedWeight};
use crate::sync::lock;

/// GGUF tensor types this loader reads (dequantized at load for now).
pub const SUPPORTED_TYPES: [GgmlDType; 11] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// An opened GGUF file: its parsed header, ready to hand out tensors.
pub struct GgufFile {
    path: PathBuf,
    content: gguf_file::Content,
    reader: Mutex<BufReader<File>>,
}

impl GgufFile {
    /// Parses the header and checks the tensor table as llama.cpp does: a power-of-two
    /// alignment, at most four non-zero dimensions per tensor, sizes that fit in 63 bits, and
    /// tensors packed one after another (each at the aligned end of the previous one) inside
    /// the file. A table that lies (an offset into another tensor, a type changed to a smaller
    /// one, a dimension of 2^63) is refused here, naming the tensor, before anything is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut reader = BufReader::new(file);
        // candle's reader divides by the file's alignment and multiplies its dimensions
        // unchecked: a panic there is a corrupt file, not a dead kernel.
        let content = crate::error::contain_panic(|| gguf_file::Content::read(&mut reader))
            .map_err(|panic| Error::corrupt(&path, format!("not a valid GGUF file: {panic}")))?
            .map_err(|e| {
                Error::corrupt(
                    &path,
                    format!(
                        "not a valid GGUF file: {}",
                        crate::error::candle_message(&e)
                    ),
                )
            })?;
        check_tensor_table(&content, &path, file_len)?;
        Ok(GgufFile {
            path,
            content,
            reader: Mutex::new(reader),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let read_vector = |name: &str| -> Result<Option<Vec<f64>>> {
            if !self.content.tensor_infos.contains_key(name) {
                return Ok(None);
            }
            let t = self.qtensor(name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
            let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            Ok(Some(v))
        };
        ModelConfig::from_gguf(&self.content, &self.path, &read_vector)
    }

    /// Reads one tensor as a quantized `QTensor`.
    pub fn qtensor(
        &self,
        gguf_name: &str,
        device: &Device,
    ) -> Result<candle_core::quantized::QTensor> {
        let info =
            self.content
                .tensor_infos
                .get(gguf_name)
                .ok_or_else(|| Error::MissingTensor {
                    path: self.path.clone(),
                    name: gguf_name.to_string(),
                })?;
        if !SUPPORTED_TYPES.contains(&info.ggml_dtype) {
            return Err(Error::unsupported(
                &self.path,
                format!("tensor type {:?} of `{gguf_name}` (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)", info.ggml_dtype),
            ));
        }
        let mut reader = lock(&self.reader);
        self.content
            .tensor(&mut *reader, gguf_name, device)
            .map_err(|e| Error::corrupt(&self.path, format!("tensor `{gguf_name}`: {e}")))
    }
}

/// A GGUF file seen as a [`WeightSource`] with Hugging Face tensor names.
pub struct GgufSource<'a> {
    file: &'a GgufFile,
    /// HF name → where it is in the file and how to bring it back to HF's convention.
    names: HashMap<String, (String, Restore)>,
}

/// What undoes a converter's change to a tensor (and, inverted, what an export applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Restore {
    Nothing,
    /// llama.cpp's q/k row permutation of the `llama` architecture, for this many heads.
    Unpermute(usize),
    /// Gemma's norms are stored as `1 + w` (the converter adds the one); HF stores `w`.
    SubtractOne,
}

/// One tensor's Hugging Face name, its llama.cpp name, and the converter's change to it.
#[derive(Debug, Clone)]
pub(crate) struct TensorName {
    pub hf: String,
    pub gguf: String,
    pub restore: Restore,
    /// The layer it belongs to (`None`: embedding, final norm, head).
    pub layer: Option<usize>,
}

/// Every tensor a checkpoint of `config`'s family may hold, by both names: what the loader
/// maps and what the GGUF export writes (a name the model lacks is skipped by both).
pub(crate) fn tensor_names(config: &ModelConfig) -> Vec<TensorName> {
    use super::config::Architecture as A;
    // Only the `llama` architecture's converter permutes q/k rows.
    let permuted = matches!(config.architecture, A::Llama | A::Mistral);
    let norm = match config.variant.norm_unit_offset {
        true => Restore::SubtractOne,
        false => Restore::Nothing,
    };
    let rows = |heads: usize| match permuted {
        true => Restore::Unpermute(heads),
        false => Restore::Nothing,
    };
    let mut names = vec![];
    let mut add = |hf: String, gguf: &str, restore: Restore, layer: Option<usize>| {
        names.push(TensorName {
            hf,
            gguf: gguf.to_string(),
            restore,
            layer,
        });
    };
    add(
        "model.embed_tokens.weight".into(),
        "token_embd.weight",
        Restore::Nothing,
        None,
    );
    add("model.norm.weight".into(), "output_norm.weight", norm, None);
    add(
        "lm_head.weight".into(),
        "output.weight",
        Restore::Nothing,
        None,
    );
    // llama.cpp's name of each HF module of a layer.
    let mut modules = vec![
        (
            "self_attn.q_proj",
            "attn_q",
            rows(config.num_attention_heads),
        ),
        (
            "self_attn.k_proj",
            "attn_k",
            rows(config.num_key_value_heads),
        ),
        ("self_attn.v_proj", "attn_v", Restore::Nothing),
        ("self_attn.qkv_proj", "attn_qkv", Restore::Nothing),
        ("self_attn.o_proj", "attn_output", Restore::Nothing),
        ("mlp.gate_proj", "ffn_gate", Restore::Nothing),
        ("mlp.up_proj", "ffn_up", Restore::Nothing),
        // Phi-3's fused gate and up are llama.cpp's `ffn_up`, twice as tall.
        ("mlp.gate_up_proj", "ffn_up", Restore::Nothing),
        ("mlp.down_proj", "ffn_down", Restore::Nothing),
        ("input_layernorm", "attn_norm", norm),
        ("self_attn.q_norm", "attn_q_norm", norm),
        ("self_attn.k_norm", "attn_k_norm", norm),
    ];
    if config.variant.sandwich_norms {
        modules.extend([
            ("post_attention_layernorm", "post_attention_norm", norm),
            ("pre_feedforward_layernorm", "ffn_norm", norm),
            ("post_feedforward_layernorm", "post_ffw_norm", norm),
        ]);
    } else {
        modules.push(("post_attention_layernorm", "ffn_norm", norm));
    }
    for l in 0..config.num_hidden_layers {
        for (hf, gguf, restore) in &modules {
            for kind in ["weight", "bias"] {
                add(
                    format!("model.layers.{l}.{hf}.{kind}"),
                    &format!("blk.{l}.{gguf}.{kind}"),
                    *restore,
                    Some(l),
                );
            }
        }
    }
    names
}

impl<'a> GgufSource<'a> {
    pub fn new(file: &'a GgufFile, config: &ModelConfig) -> Self {
        let names = tensor_names(config)
            .into_iter()
            .map(|n| (n.hf, (n.gguf, n.restore)))
            .collect();
        GgufSource { file, names }
    }

    fn gguf_name(&self, hf_name: &str) -> Option<&(String, Restore)> {
        self.names.get(hf_name)
    }
}

impl WeightSource for GgufSource<'_> {
    fn file_of(&self, _name: &str) -> PathBuf {
        self.file.path.clone()
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name)
            .is_some_and(|(g, _)| self.file.content.tensor_infos.contains_key(g))
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (g, _) = self.gguf_name(name).ok_or_else(|| Error::MissingTensor {
            path: self.file.path.clone(),
            name: name.to_string(),
        })?;
        let info = self
            .file
            .content
            .tensor_infos
            .get(g)
            .ok_or_else(|| Error::MissingTensor {
                path: self.file.path.clone(),
                name: g.clone(),
            })?;
        Ok(info.shape.dims().to_vec())
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (g, restore) = self.gguf_name(name).ok_or_else(|| Error::MissingTensor {
            path: self.file.path.clone(),
            name: name.to_string(),
        })?;
        // Dequantize on the CPU (every GGML type has a CPU kernel), then move.
        let w = self
            .file
            .qtensor(g, &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        super::weights::check_finite(&w, &self.file.path, g)?;
        let w = match restore {
            Restore::Unpermute(n) => unpermute_rows(&w, *n)?,
            Restore::SubtractOne => (w - 1.0)?,
            Restore::Nothing => w,
        };
        Ok(w.to_dtype(dtype)?.to_device(device)?)
    }

    fn load_quantized(
        &self,
        name: &str,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<Option<Arc<dyn QuantizedWeight>>> {
        if quantization != Quantization::KeepGguf {
            return Ok(None);
        }
        let Some((g, restore)) = self.gguf_name(name) else {
            return Ok(None);
        };
        let Some(info) = self.file.content.tensor_infos.get(g) else {
            return Ok(None);
        };
        // Float tensors gain nothing from the quantized path.
        if matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        ) {
            return Ok(None);
        }
        let q = self.file.qtensor(g, &Device::Cpu)?;
        let q = match restore {
            Restore::Unpermute(n) => GgmlWeight::unpermute_rows(&q, *n)
                .map_err(|e| Error::corrupt(&self.file.path, format!("tensor `{g}`: {e}")))?,
            // Only norms (kept dense) are offset.
            Restore::SubtractOne | Restore::Nothing => q,
        };
        Ok(Some(Arc::new(GgmlWeight::new(q, dtype)?)))
    }
}

/// Undoes llama.cpp's `permute(w, n_head)` of q/k rows (interleaved RoPE pairs → HF halves):
/// `w.reshape(n, rows/n/2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of [`unpermute_rows`]: HF order → llama.cpp order (for GGUF export and for
/// matching adapters to a GGUF base).
pub fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The byte size of a tensor of `dims` elements of type `dtype`, with every product checked.
fn tensor_bytes(dims: &[usize], dtype: GgmlDType) -> std::result::Result<u64, String> {
    if dims.is_empty() || dims.len() > 4 {
        return Err(format!("{} dimensions (1 to 4 expected)", dims.len()));
    }
    if dims.contains(&0) {
        return Err(format!("a zero dimension in {dims:?}"));
    }
    let elems = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| format!("dimensions {dims:?} overflow 63 bits"))?;
    let block = dtype.block_size() as u64;
    if elems % block != 0 {
        return Err(format!(
            "{elems} elements, not a multiple of its {block}-element blocks"
        ));
    }
    (elems / block)
        .checked_mul(dtype.type_size() as u64)
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| format!("dimensions {dims:?} overflow 63 bits"))
}

/// llama.cpp's rules for the tensor table (see [`GgufFile::open`]).
fn check_tensor_table(content: &gguf_file::Content, path: &Path, file_len: u64) -> Result<()> {
    let alignment = match content.metadata.get("general.alignment") {
        None => 32,
        // llama.cpp reads it as a u32 and refuses any other type.
        Some(gguf_file::Value::U32(v)) => u64::from(*v),
        Some(_) => {
            return Err(Error::corrupt(
                path,
                "general.alignment is not a u32 (llama.cpp refuses other types)",
            ))
        }
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(Error::corrupt(
            path,
            format!("general.alignment is {alignment}, not a power of two"),
        ));
    }
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let bytes = tensor_bytes(info.shape.dims(), info.ggml_dtype)
            .map_err(|what| Error::corrupt(path, format!("tensor `{name}`: {what}")))?;
        tensors.push((info.offset, bytes, name));
    }
    tensors.sort();
    let data_len = file_len.saturating_sub(content.tensor_data_offset);
    let mut expected = 0u64;
    for (offset, bytes, name) in tensors {
        if offset != expected {
            let why = if offset < expected {
                "overlaps the tensor before it"
            } else if offset % alignment != 0 {
                "is not aligned"
            } else {
                "leaves a gap after the tensor before it"
            };
            return Err(Error::corrupt(
                path,
                format!(
                    "tensor `{name}` at data offset {offset} {why} (expected offset {expected})"
                ),
            ));
        }
        let end = offset
            .checked_add(bytes)
            .filter(|&e| e <= data_len)
            .ok_or_else(|| {
                Error::corrupt(
                    path,
                    format!(
                        "truncated: tensor `{name}` ends at byte {}, the file has {file_len} bytes",
                        content.tensor_data_offset as u128 + offset as u128 + bytes as u128
                    ),
                )
            })?;
        expected = end.div_ceil(alignment) * alignment;
    }
    Ok(())
}
