//! Where a model's weights come from: a source that hands out tensors by their Hugging Face
//! names, checked against the shapes the configuration implies.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use std::sync::Arc;

use super::config::ModelConfig;
use super::decoder::{LayerWeights, ModelWeights};
use super::linear::FrozenLinear;
use crate::error::{Error, Result};
use crate::quant::{bnb, Nf4Weight, Quantization, QuantizedWeight};

/// A checkpoint that can produce tensors by Hugging Face name.
pub trait WeightSource {
    /// The file that holds `name` (for error messages).
    fn file_of(&self, name: &str) -> PathBuf;
    fn contains(&self, name: &str) -> bool;
    /// The tensor's shape without loading it.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// Loads the tensor (dequantized, converted to `dtype`) onto `device`.
    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor>;
    /// The dtype the tensor is stored in, when the format says so.
    fn dtype(&self, _name: &str) -> Option<DType> {
        None
    }
    /// The tensor kept in the file's own quantized format (GGUF), when it has one and
    /// `quantization` asks for it; `None` means load it dense.
    fn load_quantized(
        &self,
        _name: &str,
        _dtype: DType,
        _quantization: Quantization,
    ) -> Result<Option<Arc<dyn QuantizedWeight>>> {
        Ok(None)
    }
}

/// Loads every tensor the decoder needs, checking names and shapes first so that a checkpoint
/// that disagrees with its config fails before anything large is read.
pub fn load_model_weights(
    config: &ModelConfig,
    source: &dyn WeightSource,
    dtype: DType,
    device: &Device,
) -> Result<ModelWeights> {
    load_model_weights_quantized(config, source, dtype, device, Quantization::None)
}

/// [`load_model_weights`] with the decoder projections stored as `quantization` says. Each
/// projection is quantized right after it is read, so at most one layer is ever dense.
/// bitsandbytes 4-bit projections stay in NF4 whatever `quantization` says.
pub fn load_model_weights_quantized(
    config: &ModelConfig,
    source: &dyn WeightSource,
    dtype: DType,
    device: &Device,
    quantization: Quantization,
) -> Result<ModelWeights> {
    let c = config;
    let h = c.hidden_size;
    let get = |name: &str, expected: &[usize]| -> Result<Tensor> {
        if !source.contains(name) {
            return Err(Error::MissingTensor {
                path: source.file_of(name),
                name: name.to_string(),
            });
        }
        let got = source.shape(name)?;
        if got != expected {
            return Err(Error::ShapeMismatch {
                path: source.file_of(name),
                name: name.to_string(),
                expected: expected.to_vec(),
                got,
            });
        }
        source.load(name, dtype, device)
    };
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut projections = Vec::with_capacity(c.projection_names().len());
        for (block, short) in c.projection_names() {
            let module = format!("{p}.{block}.{short}");
            let shape = c
                .projection_shape(short)
                .expect("every projection name has a shape");
            let bias = match c.variant.attention_bias.covers(short) {
                true => Some(get(&format!("{module}.bias"), &shape[..1])?),
                false => None,
            };
            let linear = load_projection(
                source,
                &format!("{module}.weight"),
                &shape,
                dtype,
                device,
                quantization,
                &get,
            )?;
            projections.push(linear.with_bias(bias));
        }
        let d = c.head_dim;
        let qk_norms = match c.variant.qk_norm {
            true => Some((
                get(&format!("{p}.self_attn.q_norm.weight"), &[d])?,
                get(&format!("{p}.self_attn.k_norm.weight"), &[d])?,
            )),
            false => None,
        };
        let feedforward_norms = match c.variant.sandwich_norms {
            true => Some((
                get(&format!("{p}.pre_feedforward_layernorm.weight"), &[h])?,
                get(&format!("{p}.post_feedforward_layernorm.weight"), &[h])?,
            )),
            false => None,
        };
        layers.push(LayerWeights {
            input_layernorm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
            post_attention_layernorm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            projections,
            qk_norms,
            feedforward_norms,
        });
    }
    let embed_tokens = get("model.embed_tokens.weight", &[c.vocab_size, h])?;
    let lm_head = if c.tie_word_embeddings && !source.contains("lm_head.weight") {
        None
    } else {
        Some(get("lm_head.weight", &[c.vocab_size, h])?)
    };
    Ok(ModelWeights {
        embed_tokens,
        layers,
        norm: get("model.norm.weight", &[h])?,
        lm_head,
    })
}

/// One decoder projection, dense or quantized.
fn load_projection(
    source: &dyn WeightSource,
    name: &str,
    expected: &[usize],
    dtype: DType,
    device: &Device,
    quantization: Quantization,
    get: &dyn Fn(&str, &[usize]) -> Result<Tensor>,
) -> Result<FrozenLinear> {
    if bnb::is_bnb_4bit(source, name) {
        let q = bnb::load_nf4(source, name, expected, dtype)?.to_device(device)?;
        return Ok(FrozenLinear::quantized(Arc::new(q), None));
    }
    if let Some(q) = source.load_quantized(name, dtype, quantization)? {
        if q.shape() != (expected[0], expected[1]) {
            return Err(Error::ShapeMismatch {
                path: source.file_of(name),
                name: name.to_string(),
                expected: expected.to_vec(),
                got: vec![q.shape().0, q.shape().1],
            });
        }
        return Ok(FrozenLinear::quantized(q, None));
    }
    match quantization {
        Quantization::Nf4 { double_quant } => {
            let dense = get(name, expected)?;
            let q = Nf4Weight::quantize(&dense, double_quant)?;
            Ok(FrozenLinear::quantized(Arc::new(q), None))
        }
        Quantization::None | Quantization::KeepGguf => {
            Ok(FrozenLinear::new(get(name, expected)?, None))
        }
    }
}

/// Refuses a weight with an infinite or NaN value: a file damaged on disk or in transit, which
/// would otherwise load and turn every output into NaN. (A finite value gives `x - x = 0`
/// exactly; one pass, one temporary of the tensor's size.)
pub fn check_finite(t: &Tensor, path: &Path, name: &str) -> Result<()> {
    if !t.dtype().is_float() {
        return Ok(());
    }
    let total = t
        .sub(t)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if total == 0.0 {
        Ok(())
    } else {
        Err(Error::corrupt(
            path,
            format!("tensor `{name}` holds infinite or NaN values (a damaged file?)"),
        ))
    }
}

/// Refuses a checkpoint holding tensors of layers beyond `layers` (`{prefix}{N}.…` with
/// N ≥ layers): a config or GGUF header that under-counts the layers would otherwise load a
/// model with layers silently dropped.
pub fn check_layer_count<'a>(
    names: impl Iterator<Item = &'a str>,
    prefix: &str,
    layers: usize,
    path: &Path,
    field: &str,
) -> Result<()> {
    for name in names {
        let Some(index) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if index >= layers {
            return Err(Error::corrupt(
                path,
                format!("tensor `{name}` belongs to layer {index}, but {field} is {layers}"),
            ));
        }
    }
    Ok(())
}

/// A shard name from `model.safetensors.index.json`, refused when it could name a file outside
/// the model directory (an absolute path, `..`, an empty name): hub repositories are untrusted
/// input. Symbolic links inside the directory are followed (the hub's cache is made of them).
pub fn shard_name<'a>(index: &Path, name: &'a str) -> Result<&'a str> {
    use std::path::Component;
    let inside = !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if inside {
        Ok(name)
    } else {
        Err(Error::corrupt(
            index,
            format!("shard `{name}` is not a file name inside the model directory"),
        ))
    }
}

/// `model.safetensors`, or the shards listed in `model.safetensors.index.json`, memory-mapped.
pub struct SafetensorsSource {
    files: Vec<PathBuf>,
    tensors: MmapedSafetensors,
    /// tensor name → index into `files`
    owner: std::collections::HashMap<String, usize>,
}

impl SafetensorsSource {
    pub fn open(files: Vec<PathBuf>) -> Result<Self> {
        let mut owner = std::collections::HashMap::new();
        for (idx, file) in files.iter().enumerate() {
            let bytes = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
            // SAFETY: the file is only read; a concurrent writer would corrupt the numbers, not memory safety
            // in a way we could prevent — this is how every safetensors loader works.
            let mmap = unsafe { memmap2::Mmap::map(&bytes) }.map_err(|e| Error::io(file, e))?;
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::corrupt(file, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                if let Some(first) = owner.insert(name.to_string(), idx) {
                    return Err(Error::corrupt(
                        file,
                        format!(
                            "tensor `{name}` is also in {} (which one is meant?)",
                            files[first].display()
                        ),
                    ));
                }
            }
        }
        // SAFETY: as above.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            Error::corrupt(files.first().cloned().unwrap_or_default(), e.to_string())
        })?;
        Ok(SafetensorsSource {
            files,
            tensors,
            owner,
        })
    }

    /// The checkpoint files of a Hugging Face model directory.
    pub fn files_in_dir(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let index_data: Index = crate::error::read_json(&index)?;
            let mut files: Vec<PathBuf> = index_data
                .weight_map
                .values()
                .map(|f| Ok(dir.join(shard_name(&index, f)?)))
                .collect::<Result<_>>()?;
            if files.is_empty() {
                return Err(Error::corrupt(&index, "weight_map lists no shards"));
            }
            files.sort();
            files.dedup();
            for f in &files {
                if !f.is_file() {
                    return Err(Error::io(
                        f,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("shard listed in {} is missing", index.display()),
                        ),
                    ));
                }
            }
            return Ok(files);
        }
        Err(Error::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json in the model directory",
            ),
        ))
    }
}

impl SafetensorsSource {
    /// Every tensor name in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.owner.keys().map(String::as_str)
    }
}

impl WeightSource for SafetensorsSource {
    fn file_of(&self, name: &str) -> PathBuf {
        match self.owner.get(name) {
            Some(&i) => self.files[i].clone(),
            None => self.files.first().cloned().unwrap_or_default(),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let view = self
            .tensors
            .get(name)
            .map_err(|e| Error::corrupt(self.file_of(name), e.to_string()))?;
        Ok(view.shape().to_vec())
    }

    fn dtype(&self, name: &str) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match self.tensors.get(name).ok()?.dtype() {
            S::U8 => DType::U8,
            S::U32 => DType::U32,
            S::I64 => DType::I64,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            _ => return None,
        })
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self
            .tensors
            .load(name, device)
            .map_err(|e| Error::corrupt(self.file_of(name), format!("tensor `{name}`: {e}")))?;
        check_finite(&t, &self.file_of(name), name)?;
        Ok(t.to_dtype(dtype)?)
    }
}

impl ModelWeights {
    /// Random weights in the fixtures' style (norms `1 + 0.1·N`, the rest `N(0, std²)`), for
    /// tests and synthetic benchmarks.
    pub fn random(config: &ModelConfig, std: f64, dtype: DType, device: &Device) -> Result<Self> {
        let c = config;
        let randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?)
        };
        let norm = |n: usize| -> Result<Tensor> {
            Ok((Tensor::randn(0f32, 0.1, n, device)? + 1.0)?.to_dtype(dtype)?)
        };
        let h = c.hidden_size;
        let v = &c.variant;
        // Gemma's norms store offsets from one.
        let norm = |n: usize| -> Result<Tensor> {
            let w = norm(n)?;
            Ok(if v.norm_unit_offset { (w - 1.0)? } else { w })
        };
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                let mut projections = Vec::with_capacity(c.projection_names().len());
                for (_, name) in c.projection_names() {
                    let shape = c.projection_shape(name).expect("known projection");
                    let bias = v
                        .attention_bias
                        .covers(name)
                        .then(|| randn(&shape[..1]))
                        .transpose()?;
                    projections.push(FrozenLinear::new(randn(&shape)?, bias));
                }
                Ok(LayerWeights {
                    input_layernorm: norm(h)?,
                    post_attention_layernorm: norm(h)?,
                    projections,
                    qk_norms: v
                        .qk_norm
                        .then(|| Ok::<_, Error>((norm(c.head_dim)?, norm(c.head_dim)?)))
                        .transpose()?,
                    feedforward_norms: v
                        .sandwich_norms
                        .then(|| Ok::<_, Error>((norm(h)?, norm(h)?)))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            embed_tokens: randn(&[c.vocab_size, h])?,
            layers,
            norm: norm(h)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(randn(&[c.vocab_size, h])?)
            },
        })
    }
}
