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

/// Rewrites the scratch directory's config.json through `edit` and loads it.
fn load_with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> (Error, PathBuf) {
    let dir = scratch_model_dir(name);
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    (load_dir(&dir), path)
}

/// RoPE settings: Llama 3.1's `llama3` scaling loads in either spelling (transformers 5's
/// `rope_parameters`, 4's `rope_scaling`) to the same configuration; a type we do not know, a
/// missing field and partial rotation are refused by name.
#[test]
fn rope_settings_load_or_are_refused_by_name() {
    let llama3 = serde_json::json!({
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192
    });
    let as_llama = |c: &mut serde_json::Value| {
        c["model_type"] = "llama".into();
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        c["sliding_window"] = serde_json::Value::Null;
        c["attention_bias"] = false.into();
        c["mlp_bias"] = false.into();
        c["pretraining_tp"] = 1.into();
    };
    let load_ok = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = scratch_model_dir(name);
        let path = dir.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        edit(&mut c);
        fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
        let p = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap();
        p.model.config().clone()
    };
    let v5 = load_ok("rope-v5", &|c| {
        as_llama(c);
        c["rope_parameters"] = llama3.clone();
        c["rope_scaling"] = serde_json::Value::Null;
    });
    let v4 = load_ok("rope-v4", &|c| {
        as_llama(c);
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_theta"] = 500000.0.into();
        c["rope_scaling"] = llama3.clone();
    });
    assert_eq!(v5.variant.rope_scaling, v4.variant.rope_scaling);
    assert_eq!(v5.rope_theta, 500000.0);
    for (name, rope, says) in [
        (
            "rope-unknown",
            serde_json::json!({"rope_type": "wobbly", "rope_theta": 1e4}),
            "wobbly",
        ),
        (
            "rope-missing-factor",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5}),
            "factor",
        ),
        (
            "rope-partial",
            serde_json::json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
            "partial_rotary_factor",
        ),
    ] {
        let (err, path) = load_with_config(name, |c| c["rope_parameters"] = rope.clone());
        assert!(matches!(err, Error::Unsupported { .. }), "{name}: {err:?}");
        assert_names(&err, &path, "rope_parameters");
        assert_names(&err, &path, says);
    }
}

/// Every config key of transformers 5.24's Mistral and Llama configs that changes the
/// arithmetic, set to a value we do not implement, is refused by name; set to its neutral
/// value it loads.
#[test]
fn arithmetic_config_fields_we_do_not_implement_are_refused() {
    // (`attention_bias` and `layer_types` are implemented now: see tests/model_families.rs.)
    let cases: [(&str, serde_json::Value, &str); 7] = [
        ("mlp_bias", true.into(), "mlp_bias true"),
        ("attention_dropout", 0.1.into(), "attention_dropout 0.1"),
        ("hidden_act", "gelu".into(), "hidden_act `gelu`"),
        (
            "partial_rotary_factor",
            0.5.into(),
            "partial_rotary_factor 0.5",
        ),
        (
            "attn_logit_softcapping",
            50.0.into(),
            "attn_logit_softcapping 50.0",
        ),
        (
            "final_logit_softcapping",
            30.0.into(),
            "final_logit_softcapping 30.0",
        ),
        ("use_qk_norm", true.into(), "use_qk_norm true"),
    ];
    for (key, value, says) in cases {
        let (err, path) = load_with_config(&format!("field-{key}"), |c| c[key] = value.clone());
        assert!(matches!(err, Error::Unsupported { .. }), "{key}: {err:?}");
        assert_names(&err, &path, says);
    }
    // Neutral values (as transformers writes them for a plain model) load.
    let dir = scratch_model_dir("fields-neutral");
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    for (k, v) in [
        ("attention_bias", serde_json::json!(false)),
        ("mlp_bias", serde_json::json!(false)),
        ("attention_dropout", serde_json::json!(0.0)),
        ("pretraining_tp", serde_json::json!(1)),
        ("initializer_range", serde_json::json!(0.02)),
        (
            "layer_types",
            serde_json::json!(["sliding_attention", "sliding_attention"]),
        ),
        ("rope_scaling", serde_json::Value::Null),
    ] {
        c[k] = v;
    }
    fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    Pretrained::from_dir(&dir, &LoadOptions::default()).expect("neutral values load");
}

/// A copy of the tiny F32 GGUF with `extra` metadata added (and `extra_tensor`, a tensor name
/// holding a copy of the final norm), written with candle's GGUF writer.
fn gguf_with(
    name: &str,
    extra: Vec<(&str, candle_core::quantized::gguf_file::Value)>,
    extra_tensor: Option<&str>,
) -> PathBuf {
    use candle_core::quantized::gguf_file;
    let src = fixture("gguf/tiny-mistral-f32.gguf");
    let mut file = fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    let device = candle_core::Device::Cpu;
    let mut tensors = vec![];
    for name in content.tensor_infos.keys() {
        tensors.push((
            name.clone(),
            content.tensor(&mut file, name, &device).unwrap(),
        ));
    }
    if let Some(extra) = extra_tensor {
        let t = content
            .tensor(&mut file, "output_norm.weight", &device)
            .unwrap();
        tensors.push((extra.to_string(), t));
    }
    let path = std::env::temp_dir().join(format!("peft-{name}-{}.gguf", std::process::id()));
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut fs::File::create(&path).unwrap(), &md, &ts).unwrap();
    path
}

/// llama.cpp's RoPE variants in a GGUF are refused, not ignored.
#[test]
fn gguf_rope_settings_load_or_are_refused_by_name() {
    use candle_core::quantized::gguf_file::Value;
    use peft_prelude::model::rope_scaling::RopeScaling;
    // Linear scaling (llama.cpp's default type when only a factor is given) loads.
    for (name, extra) in [
        (
            "gguf-rope-linear",
            vec![
                ("llama.rope.scaling.type", Value::String("linear".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
            ],
        ),
        (
            "gguf-rope-factor",
            vec![("llama.rope.scaling.factor", Value::F32(4.0))],
        ),
    ] {
        let path = gguf_with(name, extra, None);
        let p = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap();
        assert_eq!(
            p.model.config().variant.rope_scaling,
            RopeScaling::Linear { factor: 4.0 },
            "{name}"
        );
        fs::remove_file(&path).unwrap();
    }
    let cases = [
        (
            "gguf-rope-yarn",
            vec![
                ("llama.rope.scaling.type", Value::String("yarn".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
            ],
            None,
            "rope.scaling.type `yarn`",
        ),
        (
            "gguf-rope-partial",
            vec![("llama.rope.dimension_count", Value::U32(8))],
            None,
            "rope.dimension_count 8",
        ),
        (
            // Llama 3's frequency factors, one per rotated pair: 64 here for 8 pairs.
            "gguf-rope-freqs",
            vec![],
            Some("rope_freqs.weight"),
            "rope_freqs has 64 entries",
        ),
    ];
    for (name, extra, tensor, says) in cases {
        let path = gguf_with(name, extra, tensor);
        let err = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::Unsupported { .. } | Error::Corrupt { .. }),
            "{name}: {err:?}"
        );
        assert_names(&err, &path, says);
        fs::remove_file(&path).unwrap();
    }
    // `none` is plain RoPE.
    let path = gguf_with(
        "gguf-rope-none",
        vec![("llama.rope.scaling.type", Value::String("none".into()))],
        None,
    );
    Pretrained::from_gguf(&path, &LoadOptions::default()).expect("rope.scaling.type none loads");
    fs::remove_file(&path).unwrap();
}

#[test]
fn a_layer_count_below_the_layers_present_is_refused() {
    // A config that under-counts the layers would load a model with layers silently dropped.
    let dir = scratch_model_dir("layer-count");
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap();
    config["num_hidden_layers"] = (layers - 1).into();
    fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let err = load_dir(&dir);
    assert_names(
        &err,
        &config_path,
        &format!(
            "belongs to layer {}, but num_hidden_layers is {}",
            layers - 1,
            layers - 1
        ),
    );
    fs::remove_dir_all(dir).unwrap();
}
