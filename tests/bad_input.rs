//! Bad input never panics: each case gives a typed error that names the file and what was wrong.

use std::fs;
use std::path::{Path, PathBuf};

use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::Error;
use peft_tests::fixture;

/// A scratch copy of the tiny-Mistral directory that a test may damage.
fn scratch_model_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-bad-input-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        fs::copy(fixture("tiny-mistral").join(f), dir.join(f)).unwrap();
    }
    dir
}

fn load_dir(dir: &Path) -> Error {
    Pretrained::from_dir(dir, &LoadOptions::default()).expect_err("loading must fail")
}

fn assert_names(err: &Error, path: &Path, what: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name {}: {msg}",
        path.display()
    );
    assert!(msg.contains(what), "error does not say `{what}`: {msg}");
}

#[test]
fn missing_model_directory_or_file() {
    let missing = std::env::temp_dir().join("peft-no-such-model-dir");
    let err = Pretrained::load(missing.to_str().unwrap(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_names(&err, &missing, "no such model directory");

    let err =
        Pretrained::from_gguf(missing.join("model.gguf"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_names(&err, &missing.join("model.gguf"), "No such file");
}

#[test]
fn missing_weights_file() {
    let dir = scratch_model_dir("no-weights");
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_dir(&dir);
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_names(&err, &dir.join("model.safetensors"), "no model.safetensors");
}

#[test]
fn truncated_safetensors() {
    let dir = scratch_model_dir("truncated-st");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_dir(&dir);
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert_names(&err, &path, "not a valid safetensors file");
}

#[test]
fn garbage_safetensors_header() {
    let dir = scratch_model_dir("garbage-st");
    let path = dir.join("model.safetensors");
    fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json at all").unwrap();
    let err = load_dir(&dir);
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert_names(&err, &path, "not a valid safetensors file");
}

#[test]
fn config_whose_shapes_disagree_with_the_weights() {
    let dir = scratch_model_dir("shape");
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("\"intermediate_size\": 160", "\"intermediate_size\": 128");
    assert!(
        text.contains("\"intermediate_size\": 128"),
        "fixture format changed"
    );
    fs::write(&path, text).unwrap();
    let err = load_dir(&dir);
    match &err {
        Error::ShapeMismatch {
            name,
            expected,
            got,
            ..
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(expected, &[128, 64]);
            assert_eq!(got, &[160, 64]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert_names(&err, &dir.join("model.safetensors"), "expected [128, 64]");
}

#[test]
fn unsupported_architecture() {
    let dir = scratch_model_dir("arch");
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("\"model_type\": \"mistral\"", "\"model_type\": \"gpt2\"");
    fs::write(&path, text).unwrap();
    let err = load_dir(&dir);
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    assert_names(&err, &path, "model_type `gpt2`");
}

#[test]
fn config_that_is_not_json() {
    let dir = scratch_model_dir("json");
    let path = dir.join("config.json");
    fs::write(&path, "{ \"model_type\": ").unwrap();
    let err = load_dir(&dir);
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert_names(&err, &path, "invalid JSON");
}

#[test]
fn truncated_gguf() {
    let src = fixture("gguf/tiny-mistral-q8_0.gguf");
    let path = std::env::temp_dir().join(format!("peft-truncated-{}.gguf", std::process::id()));
    let bytes = fs::read(&src).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert_names(&err, &path, "truncated");

    // Cut inside the header: not even the metadata can be read.
    fs::write(&path, &bytes[..100]).unwrap();
    let err = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert_names(&err, &path, "not a valid GGUF file");
    fs::remove_file(&path).unwrap();
}

#[test]
fn not_a_gguf_at_all() {
    let path = std::env::temp_dir().join(format!("peft-not-gguf-{}.gguf", std::process::id()));
    fs::write(&path, b"PK\x03\x04 this is a zip, not a gguf").unwrap();
    let err = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert_names(&err, &path, "not a valid GGUF file");
    fs::remove_file(&path).unwrap();
}

#[test]
fn unknown_module_path_suggests_close_matches() {
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let err = p.model.linear("model.layers.1.mlp.gate_prj").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::UnknownModule { .. }), "{err:?}");
    assert!(msg.contains("model.layers.1.mlp.gate_proj"), "{msg}");
}

#[test]
fn out_of_vocabulary_prompt_and_empty_prompt() {
    use peft_prelude::generate::{generate_ids, GenerationConfig, Hooks};
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let cfg = GenerationConfig::default().greedy(2);
    let err = generate_ids(
        &p.model,
        &p.tokenizer,
        &[vec![1, 99_999]],
        &cfg,
        Hooks::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("outside the model's vocabulary"),
        "{err}"
    );
    let err = generate_ids(&p.model, &p.tokenizer, &[vec![]], &cfg, Hooks::default()).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
}
