//! Loading a model with its tokenizer from what users have: a Hugging Face model directory, a
//! hub repository id (through the standard Hugging Face cache, offline when cached), or a GGUF.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::ModelConfig;
use super::decoder::{Model, ModelWeights};
use super::gguf::{GgufFile, GgufSource};
use super::linear::FrozenLinear;
use super::weights::{load_model_weights_quantized, SafetensorsSource, WeightSource};
use crate::error::{Error, Result};
use crate::generate::GenerationConfig;
pub use crate::hub::{hub_cache_dir, HubOptions};
use crate::hub::{HubRepo, RepoKind};
use crate::quant::bnb::BnbConfig;
use crate::quant::Quantization;
use crate::tokenizer::Tokenizer;

/// Where and in which precision to put the weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Embeddings, norms, lm_head, dense projections, and the outputs of quantized ones.
    pub dtype: DType,
    /// How the decoder projections are stored (default: dense).
    pub quantization: Quantization,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            quantization: Quantization::None,
        }
    }
}

impl LoadOptions {
    /// bitsandbytes-style `load_in_4bit`: NF4 with double quantization (the QLoRA setting).
    pub fn load_in_4bit() -> Self {
        LoadOptions {
            quantization: Quantization::QLORA,
            ..Default::default()
        }
    }

    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = quantization;
        self
    }
}

/// A model with everything needed to talk to it.
#[derive(Debug)]
pub struct Pretrained {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub generation_config: GenerationConfig,
    /// Where it came from (directory or file).
    pub source: PathBuf,
}

impl Pretrained {
    /// Loads from a GGUF file, a model directory, or (if neither exists) a hub repo id.
    /// A hub GGUF is named `repo_id/file.gguf` (e.g. `org/Model-GGUF/model.Q4_K_M.gguf`).
    pub fn load(source: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        Self::load_path(source.as_ref(), options)
    }

    fn load_path(path: &Path, options: &LoadOptions) -> Result<Self> {
        let source = &*path.to_string_lossy();
        if path.is_dir() {
            return Self::from_dir(path, options);
        }
        if path.is_file() {
            return Self::from_gguf(path, options);
        }
        // `org/name` (or `org/name/file.gguf`) is a hub id; anything else is a local path
        // that does not exist.
        let hub_like = !path.is_absolute()
            && !source.starts_with('.')
            && (source.matches('/').count() == 1 || split_gguf(source).is_some());
        if !hub_like {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such model directory or GGUF file",
                ),
            ));
        }
        Self::from_hub(source, options)
    }

    /// A Hugging Face model directory: config.json, model.safetensors (or a sharded index),
    /// tokenizer.json, generation_config.json when present.
    pub fn from_dir(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        Self::from_dir_path(dir.as_ref(), options)
    }

    fn from_dir_path(dir: &Path, options: &LoadOptions) -> Result<Self> {
        // Before candle's first op (its thread pools read the settings once).
        crate::threads::settle_thread_count();
        let config = ModelConfig::from_json_file(dir.join("config.json"))?;
        let weights = load_dir_weights(dir, &config, options)?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
        let generation_config = GenerationConfig::for_model(
            &config,
            &tokenizer,
            Some(dir.join("generation_config.json"))
                .filter(|p| p.is_file())
                .as_deref(),
        )?;
        Ok(Pretrained {
            model: Model::new(config, weights)?,
            tokenizer,
            generation_config,
            source: dir.to_path_buf(),
        })
    }

    /// A GGUF file of the `llama` architecture; quantized weights are dequantized at load
    /// unless `options.quantization` is [`Quantization::KeepGguf`].
    pub fn from_gguf(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        Self::from_gguf_path(path.as_ref(), options)
    }

    fn from_gguf_path(path: &Path, options: &LoadOptions) -> Result<Self> {
        // Before candle's first op (its thread pools read the settings once).
        crate::threads::settle_thread_count();
        let file = GgufFile::open(path)?;
        let config = file.config()?;
        super::weights::check_layer_count(
            file.content().tensor_infos.keys().map(String::as_str),
            "blk.",
            config.num_hidden_layers,
            file.path(),
            "block_count",
        )?;
        let weights = load_model_weights_quantized(
            &config,
            &GgufSource::new(&file, &config),
            options.dtype,
            &options.device,
            options.quantization,
        )?;
        let tokenizer = Tokenizer::from_gguf(file.content(), file.path())?;
        let generation_config = GenerationConfig::for_model(&config, &tokenizer, None)?;
        let mut model = Model::new(config.clone(), weights)?;
        if options.quantization == Quantization::KeepGguf {
            // The head is the largest single matrix (a fifth of SmolLM2): keep it in the file's
            // type too, so decoding reads 4-8 bits per weight instead of 32. The embedding
            // lookup keeps its dense table.
            let source = GgufSource::new(&file, &config);
            let name = if source.contains("lm_head.weight") {
                "lm_head.weight"
            } else {
                "model.embed_tokens.weight"
            };
            if let Some(q) = source.load_quantized(name, options.dtype, options.quantization)? {
                model.replace_linear("lm_head", |_| {
                    Ok(Box::new(FrozenLinear::quantized(q, None)))
                })?;
            }
        }
        Ok(Pretrained {
            model,
            tokenizer,
            generation_config,
            source: file.path().to_path_buf(),
        })
    }

    /// A hub repository, through the standard Hugging Face cache (`HF_HOME`, default
    /// `~/.cache/huggingface`), so files Python downloaded are reused. With `HF_HUB_OFFLINE=1`,
    /// or when every file is already cached, nothing is fetched.
    pub fn from_hub(repo: &str, options: &LoadOptions) -> Result<Self> {
        Self::from_hub_with(repo, &HubOptions::from_env(), options)
    }

    /// [`Pretrained::from_hub`] with an explicit cache directory and offline switch.
    pub fn from_hub_with(repo: &str, hub: &HubOptions, options: &LoadOptions) -> Result<Self> {
        if let Some((repo_id, file)) = split_gguf(repo) {
            let path = HubRepo::new(hub, RepoKind::Model, repo_id).get(file)?;
            return Self::from_gguf(path, options);
        }
        let hub = HubRepo::new(hub, RepoKind::Model, repo);
        let config = hub.get("config.json")?;
        let dir = config
            .parent()
            .ok_or_else(|| {
                Error::Hub(format!(
                    "{repo}: cached config.json has no parent directory"
                ))
            })?
            .to_path_buf();
        if hub.get_if_exists("model.safetensors")?.is_none() {
            let index = hub.get("model.safetensors.index.json")?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let index_data: Index = crate::error::read_json(&index)?;
            let mut shards: Vec<&str> = index_data
                .weight_map
                .values()
                .map(|name| super::weights::shard_name(&index, name))
                .collect::<Result<_>>()?;
            shards.sort();
            shards.dedup();
            for shard in shards {
                hub.get(shard)?;
            }
        }
        hub.get("tokenizer.json")?;
        for optional in ["tokenizer_config.json", "generation_config.json"] {
            hub.get_if_exists(optional)?;
        }
        Self::from_dir(dir, options)
    }
}

/// The model (no tokenizer) of a Hugging Face directory, e.g. a bitsandbytes 4-bit checkpoint.
pub fn load_model_from_dir(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Model> {
    load_model_from_dir_path(dir.as_ref(), options)
}

fn load_model_from_dir_path(dir: &Path, options: &LoadOptions) -> Result<Model> {
    let config = ModelConfig::from_json_file(dir.join("config.json"))?;
    let weights = load_dir_weights(dir, &config, options)?;
    Model::new(config, weights)
}

/// The weights of a model directory; a bitsandbytes `quantization_config` in config.json is
/// checked first (only 4-bit NF4 loads).
fn load_dir_weights(
    dir: &Path,
    config: &ModelConfig,
    options: &LoadOptions,
) -> Result<ModelWeights> {
    BnbConfig::from_config_json(dir.join("config.json"))?;
    let source = SafetensorsSource::open(SafetensorsSource::files_in_dir(dir)?)?;
    super::weights::check_layer_count(
        source.names(),
        "model.layers.",
        config.num_hidden_layers,
        &dir.join("config.json"),
        "num_hidden_layers",
    )?;
    load_model_weights_quantized(
        config,
        &source,
        options.dtype,
        &options.device,
        options.quantization,
    )
}

fn split_gguf(repo: &str) -> Option<(&str, &str)> {
    if !repo.ends_with(".gguf") {
        return None;
    }
    let (repo_id, file) = repo.rsplit_once('/')?;
    repo_id.contains('/').then_some((repo_id, file))
}
