//! Loaders beyond the single-file directory: the Hugging Face hub cache (offline), sharded
//! checkpoints, and GGUF files this crate must refuse with a clear error.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use peft_prelude::model::{HubOptions, LoadOptions, Pretrained};
use peft_prelude::Error;
use peft_tests::fixture;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-loaders-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn reference_logits() -> Tensor {
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let ids = Tensor::new(&[[1u32, 415, 2936, 9060, 285, 1142]], &Device::Cpu).unwrap();
    p.model.forward(&ids).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Lays out tiny-mistral the way huggingface_hub caches a repo:
/// `models--org--name/{refs/main, snapshots/<rev>/<files>}`.
fn fake_hub_cache(repo: &str) -> PathBuf {
    let cache = scratch("hub");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(rev);
    fs::create_dir_all(&snapshot).unwrap();
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    fs::write(repo_dir.join("refs/main"), rev).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        fs::copy(fixture("tiny-mistral").join(f), snapshot.join(f)).unwrap();
    }
    cache
}

#[test]
fn hub_repo_from_the_cache_offline() {
    let cache = fake_hub_cache("test-org/tiny-mistral");
    let hub = HubOptions {
        cache_dir: cache.clone(),
        offline: true,
    };
    let p =
        Pretrained::from_hub_with("test-org/tiny-mistral", &hub, &LoadOptions::default()).unwrap();
    let ids = Tensor::new(&[[1u32, 415, 2936, 9060, 285, 1142]], &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(&p.model.forward(&ids).unwrap(), &reference_logits()),
        0.0
    );
    assert_eq!(p.generation_config.eos_token_ids, vec![2]);

    let err = Pretrained::from_hub_with("test-org/not-cached", &hub, &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::Hub(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("test-org/not-cached") && msg.contains("offline"),
        "{msg}"
    );
    fs::remove_dir_all(cache).unwrap();
}

#[test]
fn sharded_checkpoint_with_index() {
    let dir = scratch("sharded");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        fs::copy(fixture("tiny-mistral").join(f), dir.join(f)).unwrap();
    }
    let all =
        candle_core::safetensors::load(fixture("tiny-mistral/model.safetensors"), &Device::Cpu)
            .unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (name, t) in all {
        let shard = if name.contains("layers.1") || name.starts_with("lm_head") {
            b.insert(name.clone(), t);
            "model-00002-of-00002.safetensors"
        } else {
            a.insert(name.clone(), t);
            "model-00001-of-00002.safetensors"
        };
        weight_map.insert(name, shard.into());
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let p = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap();
    let ids = Tensor::new(&[[1u32, 415, 2936, 9060, 285, 1142]], &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(&p.model.forward(&ids).unwrap(), &reference_logits()),
        0.0
    );

    // A shard that the index lists but that is missing is named in the error.
    fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("missing"),
        "{msg}"
    );
    fs::remove_dir_all(dir).unwrap();
}

/// Copies a fixture GGUF with changed metadata and/or one tensor re-typed.
fn rewrite_gguf(
    path: &PathBuf,
    set: &[(&str, gguf_file::Value)],
    retype: Option<(&str, GgmlDType)>,
) {
    let src = fixture("gguf/tiny-mistral-f32.gguf");
    let mut file = fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut metadata: Vec<(String, gguf_file::Value)> =
        content.metadata.clone().into_iter().collect();
    for (k, v) in set {
        metadata.retain(|(key, _)| key != k);
        metadata.push((k.to_string(), v.clone()));
    }
    let mut tensors: Vec<(String, QTensor)> = vec![];
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let t = match retype {
            Some((n, dtype)) if n == name => {
                QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), dtype).unwrap()
            }
            _ => t,
        };
        tensors.push((name.clone(), t));
    }
    let mut out = fs::File::create(path).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &md, &ts).unwrap();
}

#[test]
fn gguf_of_another_architecture_is_refused() {
    let dir = scratch("gguf-arch");
    let path = dir.join("falcon.gguf");
    rewrite_gguf(
        &path,
        &[(
            "general.architecture",
            gguf_file::Value::String("falcon".into()),
        )],
        None,
    );
    let err = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("falcon"),
        "{msg}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gguf_with_an_unsupported_tensor_type_is_refused() {
    let dir = scratch("gguf-type");
    let path = dir.join("q2k.gguf");
    // Q8_1 (32-element blocks fit the 64-wide rows) is a real GGML type this loader does not read.
    rewrite_gguf(&path, &[], Some(("blk.0.ffn_up.weight", GgmlDType::Q8_1)));
    let err = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.ffn_up.weight") && msg.contains("Q8_1"),
        "{msg}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gguf_and_safetensors_agree_on_the_same_weights() {
    // The F32 GGUF run with the window removed equals the safetensors model without window:
    // the q/k un-permutation and the name mapping are exact.
    let mut st = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    st.model.set_sliding_window(None);
    let gguf = Pretrained::from_gguf(
        fixture("gguf/tiny-mistral-f32.gguf"),
        &LoadOptions::default(),
    )
    .unwrap();
    let ids = Tensor::new(
        &[[1u32, 415, 2936, 9060, 285, 1142, 461, 10575, 754, 272]],
        &Device::Cpu,
    )
    .unwrap();
    let d = max_diff(
        &st.model.forward(&ids).unwrap(),
        &gguf.model.forward(&ids).unwrap(),
    );
    assert!(d < 1e-5, "{d}");
    assert_eq!(st.model.config().vocab_size, gguf.model.config().vocab_size);
}
