//! The file kinds: how each one's seed files are made (from the committed tiny fixtures), which
//! file of a case is mutated and how, and what loading it and using it means.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use peft_prelude::data::Dataset;
use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::peft::{
    get_peft_model, BottleneckConfig, Ia3Config, LoraConfig, PeftConfig, PeftModel,
    PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
};
use peft_prelude::quant::Quantization;
use peft_prelude::tokenizer::Tokenizer;
use peft_prelude::train::{SftTrainer, TrainingArgs};

use crate::mutate::{self, Rng};

/// Marks a mutation that changed weight values only: a well-formed file with damaged numbers,
/// which no loader can tell from a real model (PyTorch and llama.cpp load it too). Non-finite
/// outputs from such a file are counted as `damaged`, apart from the bad classes.
pub const DATA_ONLY: &str = "[tensor data only]";

pub const KINDS: [&str; 8] = [
    "gguf",
    "safetensors",
    "config",
    "tokenizer",
    "sharded",
    "adapter",
    "dataset",
    "checkpoint",
];

/// What a loaded file turned out to be when used.
pub enum Used {
    Fine,
    /// Loaded without an error but wrong: non-finite outputs, a file outside the model
    /// directory read, an absurd step count.
    Absurd(String),
}

/// An error of a case: from loading (it must name the file) or from using what loaded.
pub struct Failure {
    pub error: peft_prelude::Error,
    pub during_use: bool,
}

impl From<peft_prelude::Error> for Failure {
    fn from(error: peft_prelude::Error) -> Self {
        Failure {
            error,
            during_use: false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

fn in_use(error: peft_prelude::Error) -> Failure {
    Failure {
        error,
        during_use: true,
    }
}

pub type Outcome = Result<Used, Failure>;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn family(name: &str) -> PathBuf {
    peft_tests::fixture(&format!("families/{name}"))
}

/// A model directory without the fixture's reference outputs (what a hub download holds).
fn model_dir(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(family(name).join(f), to.join(f)).unwrap();
    }
}

fn adapter_configs() -> Vec<(&'static str, PeftConfig)> {
    vec![
        ("ia3", Ia3Config::default().into()),
        (
            "prompt",
            PromptTuningConfig {
                prompt: prompt_common(4),
                ..Default::default()
            }
            .into(),
        ),
        (
            "ptuning-mlp",
            PromptEncoderConfig {
                prompt: prompt_common(4),
                encoder_hidden_size: Some(16),
                ..Default::default()
            }
            .into(),
        ),
        (
            "ptuning-lstm",
            PromptEncoderConfig {
                prompt: prompt_common(4),
                encoder_reparameterization_type: "LSTM".into(),
                encoder_hidden_size: Some(16),
                ..Default::default()
            }
            .into(),
        ),
        (
            "prefix",
            PrefixTuningConfig {
                prompt: prompt_common(4),
                prefix_projection: true,
                encoder_hidden_size: Some(16),
                ..Default::default()
            }
            .into(),
        ),
        ("bottleneck", BottleneckConfig::default().into()),
        ("lora-all", LoraConfig::all_projections(4, 8.0).into()),
    ]
}

fn prompt_common(n: usize) -> peft_prelude::peft::PromptLearningCommon {
    peft_prelude::peft::PromptLearningCommon {
        num_virtual_tokens: n,
        ..Default::default()
    }
}

fn base() -> Pretrained {
    Pretrained::from_dir(family("qwen2"), &LoadOptions::default()).expect("the seed model loads")
}

fn records(n: usize) -> Dataset {
    let rows: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}?"), "completion": format!(" A{i}.")}))
        .collect();
    Dataset::from_records(&rows).unwrap()
}

fn trainer(out: &Path) -> peft_prelude::Result<SftTrainer> {
    let p = base();
    let peft = get_peft_model(p.model, LoraConfig::all_projections(4, 8.0))?;
    let args = TrainingArgs {
        output_dir: out.to_path_buf(),
        per_device_train_batch_size: 2,
        learning_rate: 1e-3,
        max_steps: 4,
        logging_steps: 1,
        max_seq_length: 16,
        ..Default::default()
    };
    SftTrainer::new(peft, p.tokenizer, &records(6), args)
}

/// Writes every kind's seed files under `dir` (known good: each loads and is used cleanly).
pub fn make_seeds(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    // gguf: f32 and Q8_0 files of a byte-level BPE (Qwen 2) and a SentencePiece (Gemma 2) model.
    let g = dir.join("gguf");
    std::fs::create_dir_all(&g).unwrap();
    for (fam, f) in [
        ("qwen2", "model-f32.gguf"),
        ("qwen2", "model-q8_0.gguf"),
        ("gemma2", "model-q8_0.gguf"),
    ] {
        std::fs::copy(family(fam).join(f), g.join(format!("{fam}-{f}"))).unwrap();
    }
    for fam in ["qwen2", "gemma2"] {
        model_dir(fam, &dir.join("model").join(fam));
    }
    // sharded: the Qwen 2 weights in two shards with an index, and a third copy outside the
    // directory that a traversing index could name.
    let sharded = dir.join("sharded/model");
    model_dir("qwen2", &sharded);
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let tensors =
        candle_core::safetensors::load(family("qwen2").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let subset: Vec<(&String, &Tensor)> = part.iter().map(|n| (*n, &tensors[*n])).collect();
        candle_core::safetensors::save(
            &subset
                .into_iter()
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
            sharded.join(shard),
        )
        .unwrap();
        for n in part {
            weight_map.insert((*n).clone(), shard.into());
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&serde_json::json!({"metadata": {}, "weight_map": weight_map}))
            .unwrap(),
    )
    .unwrap();
    std::fs::copy(
        family("qwen2").join("model.safetensors"),
        dir.join("sharded/outside.safetensors"),
    )
    .unwrap();
    // adapters: PEFT's LoRA fixture and one of each other method, saved by us.
    let adapters = dir.join("adapter");
    copy_dir(&family("qwen2").join("lora"), &adapters.join("lora"));
    for (name, config) in adapter_configs() {
        let peft = get_peft_model(base().model, config).unwrap();
        peft.save_pretrained(adapters.join(name)).unwrap();
    }
    // datasets
    let data = dir.join("dataset");
    std::fs::create_dir_all(&data).unwrap();
    for f in [
        "records.jsonl",
        "records.snappy.parquet",
        "records.zstd.parquet",
    ] {
        std::fs::copy(peft_tests::fixture(&format!("data/{f}")), data.join(f)).unwrap();
    }
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(data.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    std::fs::write(
        data.join("records.json"),
        serde_json::to_vec(&rows).unwrap(),
    )
    .unwrap();
    // checkpoint: one step of LoRA SFT on Qwen 2.
    let out = dir.join("checkpoint-run");
    let mut t = trainer(&out).unwrap();
    t.train_steps(1).unwrap();
    let ckpt = t.save_checkpoint().unwrap();
    std::fs::rename(ckpt, dir.join("checkpoint")).unwrap();
    std::fs::remove_dir_all(out).unwrap();
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// Mutates `file` in place with the mutator its format calls for; returns what was done.
fn mutate_file(file: &Path, rng: &mut Rng) -> String {
    let mut bytes = std::fs::read(file).unwrap();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let what = if name.ends_with(".gguf") {
        mutate::gguf(&mut bytes, rng)
    } else if name.ends_with(".safetensors") {
        let original = bytes.clone();
        let what = mutate::safetensors(&mut bytes, rng);
        if mutate::only_tensor_data_changed(&original, &bytes) {
            format!("{what} {DATA_ONLY}")
        } else {
            what
        }
    } else if name.ends_with(".json") {
        mutate::json(&mut bytes, rng)
    } else if name.ends_with(".jsonl") {
        // One line's document, or the text.
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        if !lines.is_empty() && rng.chance(70) {
            let i = rng.below(lines.len());
            let mut line = lines[i].as_bytes().to_vec();
            let what = mutate::json(&mut line, rng);
            let mut out: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            out[i] = String::from_utf8_lossy(&line).into_owned();
            bytes = out.join("\n").into_bytes();
            format!("line {i}: {what}")
        } else {
            mutate::blind(&mut bytes, rng)
        }
    } else {
        mutate::blind(&mut bytes, rng)
    };
    std::fs::write(file, bytes).unwrap();
    format!("{name}: {what}")
}

fn finite(t: &Tensor) -> bool {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map(|v| v.iter().all(|x| x.is_finite()))
        .unwrap_or(false)
}

/// Runs a forward pass on a few tokens: finite logits of the right shape, or absurd.
fn use_model(model: &peft_prelude::model::Model) -> Outcome {
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).map_err(|e| in_use(e.into()))?;
    let logits = model.forward(&ids).map_err(in_use)?;
    check_logits(&logits, model.config().vocab_size)
}

fn check_logits(logits: &Tensor, vocab: usize) -> Outcome {
    // Prompt tuning and P-tuning return the virtual tokens' logits too (as PEFT does).
    let d = logits.dims();
    if d.len() != 3 || d[0] != 1 || d[2] != vocab || !(4..=4 + (1 << 16)).contains(&d[1]) {
        return Ok(Used::Absurd(format!("logits of shape {:?}", logits.dims())));
    }
    if !finite(logits) {
        return Ok(Used::Absurd("non-finite logits".into()));
    }
    Ok(Used::Fine)
}

fn use_tokenizer(tok: &Tokenizer) -> Outcome {
    let ids = tok
        .encode("Hello wörld, 123 <|im_end|> ▁x", true)
        .map_err(in_use)?;
    tok.decode(&ids, false).map_err(in_use)?;
    let mut stream = tok.stream(false);
    for id in ids {
        stream.push(id).map_err(in_use)?;
    }
    Ok(Used::Fine)
}

/// Prepares case `index` of `kind` in `case_dir` (from the seeds in `seeds`) and returns the
/// mutation's description and the closure that loads and uses it.
pub fn prepare(
    kind: &str,
    seeds: &Path,
    case_dir: &Path,
    rng: &mut Rng,
) -> (String, Box<dyn FnOnce() -> Outcome>) {
    let _ = std::fs::remove_dir_all(case_dir);
    std::fs::create_dir_all(case_dir).unwrap();
    let keep_gguf = rng.chance(50);
    match kind {
        "gguf" => {
            let seed = rng.pick(&files_in(&seeds.join("gguf"))).clone();
            let file = case_dir.join(seed.file_name().unwrap());
            std::fs::copy(&seed, &file).unwrap();
            let what = mutate_file(&file, rng);
            (
                what,
                Box::new(move || {
                    let options = LoadOptions::default().with_quantization(if keep_gguf {
                        Quantization::KeepGguf
                    } else {
                        Quantization::None
                    });
                    let p = Pretrained::from_gguf(&file, &options)?;
                    match use_model(&p.model)? {
                        Used::Fine => use_tokenizer(&p.tokenizer),
                        absurd => Ok(absurd),
                    }
                }),
            )
        }
        "safetensors" | "config" | "tokenizer" => {
            let fam = rng.pick(&subdirs(&seeds.join("model"))).clone();
            let dir = case_dir.join("model");
            copy_dir(&fam, &dir);
            let file = match kind {
                "safetensors" => dir.join("model.safetensors"),
                "config" => dir.join(*rng.pick(&[
                    "config.json",
                    "config.json",
                    "generation_config.json",
                    "tokenizer_config.json",
                ])),
                _ => dir.join("tokenizer.json"),
            };
            let what = mutate_file(&file, rng);
            let four_bit = kind != "tokenizer" && rng.chance(25);
            let tokenizer_only = kind == "tokenizer";
            (
                what,
                Box::new(move || {
                    if tokenizer_only {
                        return use_tokenizer(&Tokenizer::from_file(&dir)?);
                    }
                    let options = if four_bit {
                        LoadOptions::load_in_4bit()
                    } else {
                        LoadOptions::default()
                    };
                    let p = Pretrained::from_dir(&dir, &options)?;
                    match use_model(&p.model)? {
                        Used::Fine => use_tokenizer(&p.tokenizer),
                        absurd => Ok(absurd),
                    }
                }),
            )
        }
        "sharded" => {
            copy_dir(&seeds.join("sharded"), case_dir);
            let dir = case_dir.join("model");
            let index = dir.join("model.safetensors.index.json");
            let what = if rng.chance(15) {
                // A shard path that leaves the directory: relative or absolute.
                let text = std::fs::read_to_string(&index).unwrap();
                let outside = case_dir.join("outside.safetensors");
                // (A symbolic link inside the directory is followed: the hub's cache is made of
                // them, and whoever placed it was on this machine already.)
                let target = match rng.below(3) {
                    0 => "../outside.safetensors".to_string(),
                    1 => outside.display().to_string(),
                    _ => "shards/../../outside.safetensors".to_string(),
                };
                let text = text.replace("model-00001-of-00002.safetensors", &target);
                std::fs::write(&index, text).unwrap();
                format!("shard path {target} (leaves the directory)")
            } else {
                let files = files_in(&dir);
                let shards: Vec<&PathBuf> = files
                    .iter()
                    .filter(|p| {
                        p.to_string_lossy().contains("-of-")
                            || p.ends_with("model.safetensors.index.json")
                    })
                    .collect();
                let shard = shards[rng.below(shards.len())].clone();
                mutate_file(&shard, rng)
            };
            let traversal = what.contains("leaves the directory");
            (
                what,
                Box::new(move || {
                    let p = Pretrained::from_dir(&dir, &LoadOptions::default())?;
                    if traversal {
                        return Ok(Used::Absurd(
                            "read a shard outside the model directory".into(),
                        ));
                    }
                    use_model(&p.model)
                }),
            )
        }
        "adapter" => {
            let seed = rng.pick(&subdirs(&seeds.join("adapter"))).clone();
            let dir = case_dir.join("adapter");
            copy_dir(&seed, &dir);
            let file = rng.pick(&files_in(&dir)).clone();
            let what = format!(
                "{}/{}",
                seed.file_name().unwrap().to_string_lossy(),
                mutate_file(&file, rng)
            );
            (
                what,
                Box::new(move || {
                    let peft = PeftModel::from_pretrained(base().model, &dir)?;
                    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)
                        .map_err(|e| in_use(e.into()))?;
                    let logits = peft.forward(&ids).map_err(in_use)?;
                    check_logits(&logits, peft.model().config().vocab_size)
                }),
            )
        }
        "dataset" => {
            let seed = rng.pick(&files_in(&seeds.join("dataset"))).clone();
            let file = case_dir.join(seed.file_name().unwrap());
            std::fs::copy(&seed, &file).unwrap();
            let what = mutate_file(&file, rng);
            (
                what,
                Box::new(move || {
                    let d = Dataset::from_file(&file)?;
                    if d.is_empty() {
                        return Ok(Used::Absurd(
                            "an empty dataset loaded without an error".into(),
                        ));
                    }
                    Ok(Used::Fine)
                }),
            )
        }
        "checkpoint" => {
            let dir = case_dir.join("checkpoint");
            copy_dir(&seeds.join("checkpoint"), &dir);
            let file = rng.pick(&files_in(&dir)).clone();
            let what = mutate_file(&file, rng);
            let out = case_dir.join("run");
            (
                what,
                Box::new(move || {
                    let mut t = trainer(&out)?;
                    t.resume_from_checkpoint(&dir)?;
                    let step = t.state().global_step;
                    if step > 1_000_000 {
                        return Ok(Used::Absurd(format!("resumed at step {step}")));
                    }
                    let before = step;
                    let r = t.train_steps(1).map_err(in_use)?;
                    if !r.training_loss.is_finite() || t.state().global_step != before + 1 {
                        return Ok(Used::Absurd(format!(
                            "loss {} after resuming at step {before}",
                            r.training_loss
                        )));
                    }
                    Ok(Used::Fine)
                }),
            )
        }
        other => panic!("unknown kind {other}"),
    }
}
