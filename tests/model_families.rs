//! Llama 3 (llama3 RoPE), Qwen 2 (q/k/v bias), Qwen 3 (per-head q/k norms), Gemma 2 (GeGLU,
//! (1 + w) norms, sandwich norms, soft-capping, alternating sliding windows) and Gemma 3 (per-head
//! norms, separate local/global RoPE) against transformers 5.24 on tiny random models
//! (`tests/fixtures/families/`, made by its `generate.py`): logits of a sequence and of a
//! right-padded batch, KV-cached greedy decoding, PEFT LoRA adapters, a QLoRA training step,
//! and the merged 16-bit export reloaded.

use candle_core::{DType, Device, Tensor};
use peft_prelude::model::load::load_model_from_dir;
use peft_prelude::model::{CausalLm, Forward, LoadOptions, Model, ModelConfig, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig, LoraInit, PeftModel, TargetModules};
use peft_prelude::train::loss::causal_lm_loss;
use peft_prelude::train::optim::{AdamW, AdamWConfig};
use peft_tests::{fixture, max_abs_diff, tensors};

const TOL: f32 = 1e-4;

const FAMILIES: [&str; 6] = ["llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];

fn load(family: &str) -> Model {
    load_model_from_dir(
        fixture(&format!("families/{family}")),
        &LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{family}: {e}"))
}

fn reference(family: &str) -> std::collections::HashMap<String, Tensor> {
    tensors(&format!("families/{family}/reference.safetensors"))
}

fn ids(r: &std::collections::HashMap<String, Tensor>, key: &str) -> Tensor {
    r[key].to_dtype(DType::U32).unwrap()
}

#[test]
fn configs_read_each_familys_arithmetic() {
    use peft_prelude::model::variant::{Activation, AttentionBias, LayerKind};
    let config = |f: &str| load(f).config().clone();
    let llama3 = config("llama3");
    assert!(llama3.tie_word_embeddings);
    assert_ne!(
        llama3.variant.rope_scaling,
        peft_prelude::model::rope_scaling::RopeScaling::Default
    );
    assert_eq!(config("qwen2").variant.attention_bias, AttentionBias::Qkv);
    assert!(config("qwen3").variant.qk_norm);
    let gemma2 = config("gemma2");
    assert_eq!(gemma2.variant.activation, Activation::GeluTanh);
    assert_eq!(gemma2.variant.attn_logit_softcapping, Some(50.0));
    assert_eq!(gemma2.variant.final_logit_softcapping, Some(30.0));
    assert_eq!(gemma2.layer_kind(0), LayerKind::Sliding);
    assert_eq!(gemma2.layer_kind(1), LayerKind::Full);
    assert_eq!(gemma2.cache_window(), None, "mixed layers keep every key");
    let gemma3 = config("gemma3");
    assert!(gemma3.variant.qk_norm && gemma3.variant.local_rope.is_some());
}

#[test]
fn logits_match_transformers() {
    for family in FAMILIES {
        let model = load(family);
        let r = reference(family);
        let logits = model.forward(&ids(&r, "a.input_ids")).unwrap();
        let diff = max_abs_diff(&logits, &r["a.logits"]);
        eprintln!("{family}: max |diff| = {diff:e}");
        assert!(diff <= TOL, "{family}: logits differ by {diff}");
    }
}

#[test]
fn right_padded_batch_matches_transformers() {
    for family in FAMILIES {
        let model = load(family);
        let r = reference(family);
        let mask = ids(&r, "b.attention_mask");
        let logits = model
            .forward_with(Forward::ids(&ids(&r, "b.input_ids")).with_attention_mask(&mask))
            .unwrap();
        let valid = mask.to_vec2::<u32>().unwrap();
        let (ours, theirs) = (
            logits.to_vec3::<f32>().unwrap(),
            r["b.logits"].to_vec3::<f32>().unwrap(),
        );
        let mut worst = 0f32;
        for (b, row) in valid.iter().enumerate() {
            for (t, m) in row.iter().enumerate() {
                if *m == 1 {
                    for (x, y) in ours[b][t].iter().zip(&theirs[b][t]) {
                        worst = worst.max((x - y).abs());
                    }
                }
            }
        }
        assert!(valid[1].contains(&0), "{family}: row 1 is padded");
        assert!(worst <= TOL, "{family}: padded batch differs by {worst}");
    }
}

#[test]
fn kv_cached_greedy_decoding_matches_transformers() {
    for family in FAMILIES {
        let model = load(family);
        let r = reference(family);
        let prompt: Vec<u32> = ids(&r, "c.prompt_ids")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected: Vec<u32> = ids(&r, "c.output_ids")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let steps = r["c.step_logits"].to_vec2::<f32>().unwrap();
        let mut cache = model.new_cache();
        let mut input = prompt.clone();
        let mut produced = vec![];
        let mut worst = 0f32;
        for step in &steps {
            let x = Tensor::new(input.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits: Vec<f32> = model
                .forward_last(Forward::ids(&x).with_cache(&mut cache))
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in logits.iter().zip(step) {
                worst = worst.max((a - b).abs());
            }
            let next = peft_prelude::generate::sampling::argmax(&logits);
            produced.push(next);
            input = vec![next];
        }
        assert_eq!(
            produced,
            expected[prompt.len()..],
            "{family}: greedy tokens"
        );
        assert!(worst <= TOL, "{family}: step logits differ by {worst}");
    }
}

#[test]
fn peft_lora_adapters_match_peft() {
    for family in ["qwen2", "gemma2", "phi3"] {
        let r = reference(family);
        let peft =
            PeftModel::from_pretrained(load(family), fixture(&format!("families/{family}/lora")))
                .unwrap_or_else(|e| panic!("{family}: {e}"));
        let logits = peft.logits(Forward::ids(&ids(&r, "a.input_ids"))).unwrap();
        let diff = max_abs_diff(&logits, &r["a.lora_logits"]);
        assert!(diff <= TOL, "{family}: LoRA logits differ by {diff}");
        // The adapter acts (its logits are not the base model's).
        assert!(max_abs_diff(&logits, &r["a.logits"]) > 1e-2, "{family}");
    }
}

#[test]
fn qlora_training_lowers_the_loss_on_every_family() {
    for family in FAMILIES {
        let model = load_model_from_dir(
            fixture(&format!("families/{family}")),
            &LoadOptions::load_in_4bit(),
        )
        .unwrap();
        // Every projection (Phi-3's fused ones included), as `all-linear` selects them.
        let config = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Some(TargetModules::all_linear()),
            ..Default::default()
        };
        let peft = get_peft_model(model, config).unwrap();
        let targeted = peft.model().linear_paths().len() - 1;
        assert_eq!(
            peft.trainable_vars().len(),
            2 * targeted,
            "{family}: A and B per projection"
        );
        let r = reference(family);
        let x = ids(&r, "a.input_ids");
        let vars = peft.trainable_vars();
        let mut opt = AdamW::new(
            vars.clone(),
            AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        let mut losses = vec![];
        for _ in 0..4 {
            let logits = peft.logits(Forward::ids(&x)).unwrap();
            let (loss, _) = causal_lm_loss(&logits, &x).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let grads = loss.backward().unwrap();
            let g: Vec<Option<Tensor>> = vars
                .iter()
                .map(|(_, v)| grads.get(v.as_tensor()).cloned())
                .collect();
            assert!(
                g.iter().all(Option::is_some),
                "{family}: every LoRA weight gets a gradient"
            );
            opt.step(&g).unwrap();
        }
        assert!(losses[3] < losses[0], "{family}: {losses:?}");
    }
}

#[test]
fn merged_16bit_export_reloads_with_the_adapters_answers() {
    for family in ["qwen2", "gemma2", "gemma3", "phi3"] {
        let config = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Some(TargetModules::all_linear()),
            init_lora_weights: LoraInit::Bool(false),
            ..Default::default()
        };
        let peft = get_peft_model(load(family), config).unwrap();
        let r = reference(family);
        let x = ids(&r, "a.input_ids");
        let want = peft.logits(Forward::ids(&x)).unwrap();
        let dir =
            std::env::temp_dir().join(format!("peft-families-{family}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tokenizer =
            peft_prelude::tokenizer::Tokenizer::from_file(fixture("tiny-mistral/tokenizer.json"))
                .unwrap();
        peft.save_pretrained_merged(&dir, &tokenizer, "merged_16bit")
            .unwrap();
        let again = load_model_from_dir(&dir, &LoadOptions::default()).unwrap();
        assert_eq!(again.config().architecture, peft.config().architecture);
        let got = again.forward(&x).unwrap();
        // f16 storage of every weight: a few 1e-3.
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 2e-2, "{family}: merged export differs by {diff}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn config_error(json: serde_json::Value) -> String {
    ModelConfig::from_json_str(&json.to_string())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("{json} was accepted"))
}

fn llama_json() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    })
}

#[test]
fn bad_family_configs_are_errors_naming_the_field() {
    let mut unknown = llama_json();
    unknown["rope_parameters"] = serde_json::json!({"rope_type": "wobbly", "rope_theta": 1e4});
    let msg = config_error(unknown);
    assert!(msg.contains("wobbly"), "{msg}");

    let mut missing = llama_json();
    missing["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5});
    let msg = config_error(missing);
    assert!(msg.contains("factor"), "{msg}");

    let mut layers = llama_json();
    layers["model_type"] = "gemma2".into();
    layers["sliding_window"] = 4.into();
    layers["layer_types"] = serde_json::json!(["sliding_attention"]);
    let msg = config_error(layers);
    assert!(msg.contains("layer_types"), "{msg}");

    let mut softcap = llama_json();
    softcap["attn_logit_softcapping"] = 50.0.into();
    let msg = config_error(softcap);
    assert!(msg.contains("attn_logit_softcapping"), "{msg}");

    let mut theta = llama_json();
    theta["rope_theta"] = (-1.0).into();
    let msg = config_error(theta);
    assert!(msg.contains("rope_theta"), "{msg}");
}

#[test]
fn peft_default_targets_follow_the_family() {
    use peft_prelude::peft::Ia3Config;
    // LoRA: q_proj and v_proj everywhere PEFT has a default.
    let peft = get_peft_model(load("gemma3"), LoraConfig::default()).unwrap();
    let mut targeted: Vec<String> = peft
        .trainable_vars()
        .iter()
        .map(|(n, _)| n.split(".lora_").next().unwrap().to_string())
        .collect();
    targeted.dedup();
    assert!(
        targeted
            .iter()
            .all(|p| p.ends_with("q_proj") || p.ends_with("v_proj")),
        "{targeted:?}"
    );
    assert_eq!(targeted.len(), 2 * 3, "q and v of 3 layers");
    // IA³ on Qwen scales q, v and down (Llama's default scales k instead of q).
    let peft = get_peft_model(load("qwen2"), Ia3Config::default()).unwrap();
    let names: Vec<String> = peft
        .trainable_vars()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert!(names.iter().any(|n| n.contains("q_proj")), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("k_proj")), "{names:?}");
    // Phi-3: PEFT has no default; neither do we, and the error says what to name.
    let err = get_peft_model(load("phi3"), LoraConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("qkv_proj") && err.contains("phi3"), "{err}");
}

fn gguf_reference(family: &str) -> std::collections::HashMap<String, Tensor> {
    tensors(&format!("families/{family}/gguf_reference.safetensors"))
}

fn load_gguf(family: &str, file: &str) -> Pretrained {
    Pretrained::from_gguf(
        fixture(&format!("families/{family}/{file}")),
        &LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{family}/{file}: {e}"))
}

/// GGUF files made by llama.cpp's own converter. Where the file says all that transformers
/// knows (Llama 3's frequency factors, Qwen's biases and norms, Phi-3's fused projections and
/// long/short factors) the logits are transformers'. Gemma's GGUF has no
/// `query_pre_attn_scalar` and Gemma 3's no layer pattern: there the file means what llama.cpp
/// makes of it (scores scaled by the head size, Gemma 3 sliding in 5 of every 6 layers), and
/// llama.cpp's own logits are the reference.
#[test]
fn gguf_files_from_llama_cpps_converter_answer_as_their_consumers_do() {
    for family in ["llama3", "qwen2", "qwen3", "phi3"] {
        let p = load_gguf(family, "model-f32.gguf");
        assert_eq!(
            p.model.config().architecture,
            load(family).config().architecture
        );
        let r = reference(family);
        let diff = max_abs_diff(
            &p.model.forward(&ids(&r, "a.input_ids")).unwrap(),
            &r["a.logits"],
        );
        eprintln!("{family} GGUF vs transformers: {diff:e}");
        assert!(
            diff <= TOL,
            "{family}: GGUF logits differ from transformers by {diff}"
        );
    }
    for family in ["gemma2", "gemma3"] {
        let p = load_gguf(family, "model-f32.gguf");
        let r = reference(family);
        let llama_cpp = &gguf_reference(family)["f32.a.logits"];
        let ours = p.model.forward(&ids(&r, "a.input_ids")).unwrap();
        let diff = max_abs_diff(&ours, llama_cpp);
        eprintln!("{family} GGUF vs llama.cpp: {diff:e}");
        // ggml's GELU reads a 16-bit table (about 1e-3 off the function): a few 1e-4 here.
        assert!(
            diff <= 2e-3,
            "{family}: GGUF logits differ from llama.cpp's by {diff}"
        );
        let argmax = |t: &Tensor| -> Vec<u32> {
            let best = t.argmax(candle_core::D::Minus1).unwrap();
            best.flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_eq!(argmax(&ours), argmax(llama_cpp), "{family}: greedy choices");
        // What the file leaves out makes it another model than transformers' (a loader that
        // took those settings from anywhere but the file would be caught here).
        assert!(max_abs_diff(&ours, &r["a.logits"]) > 1e-2, "{family}");
    }
    // Q8_0: within the quantization's reach of the f32 model, and of llama.cpp on the same file.
    for family in ["qwen2", "gemma2"] {
        let p = load_gguf(family, "model-q8_0.gguf");
        let x = ids(&reference(family), "a.input_ids");
        let ours = p.model.forward(&x).unwrap();
        let f32_file = load_gguf(family, "model-f32.gguf")
            .model
            .forward(&x)
            .unwrap();
        let to_f32 = max_abs_diff(&ours, &f32_file);
        let to_llama_cpp = max_abs_diff(&ours, &gguf_reference(family)["q8_0.a.logits"]);
        eprintln!("{family} Q8_0: vs f32 {to_f32:e}, vs llama.cpp {to_llama_cpp:e}");
        assert!(
            to_f32 < 0.15 && to_llama_cpp < 0.15,
            "{family}: {to_f32} {to_llama_cpp}"
        );
    }
}

/// bitsandbytes 4-bit checkpoints (`*-bnb-4bit`) of two families: the NF4 codes are read
/// exactly, so the logits are bitsandbytes' float32 ones.
#[test]
fn bnb_4bit_checkpoints_match_bitsandbytes() {
    for family in ["qwen2-bnb-4bit", "gemma3-bnb-4bit"] {
        let model = load(family);
        let r = reference(family);
        let diff = max_abs_diff(
            &model.forward(&ids(&r, "a.input_ids")).unwrap(),
            &r["a.logits"],
        );
        eprintln!("{family}: {diff:e}");
        assert!(diff <= TOL, "{family}: differs from bitsandbytes by {diff}");
    }
}

/// The families' tokenizers (Qwen's byte-level BPE, Llama 3's, Gemma's and Llama 2's
/// SentencePiece, trained small for the fixtures) give the `tokenizers` library's ids from
/// tokenizer.json, and from the metadata of llama.cpp's GGUF files.
#[test]
fn family_tokenizers_match_the_tokenizers_library() {
    use peft_prelude::tokenizer::Tokenizer;
    let all = peft_tests::json_fixture("families/tokenizers.json");
    for (kind, spec) in all["kinds"].as_object().unwrap() {
        let meta = &spec["meta"];
        let json_path = fixture(&format!(
            "families/{}",
            meta["tokenizer_json"].as_str().unwrap()
        ));
        let dir = meta["dirs"][0].as_str().unwrap();
        let from_json = Tokenizer::from_file(&json_path).unwrap();
        let from_gguf =
            Tokenizer::from_gguf_file(fixture(&format!("families/{dir}/model-f32.gguf")))
                .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let mut gguf_differs = vec![];
        for case in spec["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = |k: &str| -> Vec<u32> { serde_json::from_value(case[k].clone()).unwrap() };
            assert_eq!(
                from_json.encode(text, false).unwrap(),
                want("ids"),
                "{kind}: {text:?}"
            );
            assert_eq!(
                from_json.encode(text, true).unwrap(),
                want("ids_with_special"),
                "{kind}: {text:?} with special tokens"
            );
            assert_eq!(
                from_json.decode(&want("ids"), false).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{kind}: decode {text:?}"
            );
            if from_gguf.encode(text, true).unwrap() != want("ids_with_special") {
                gguf_differs.push(text.to_string());
            }
        }
        // GGUF keeps no normalizer: Qwen's NFC step is lost there (llama.cpp gives the same
        // three ids for a decomposed "é"); nothing else may differ.
        let allowed: &[&str] = if kind == "qwen2" { &["e\u{301}"] } else { &[] };
        assert!(
            gguf_differs.iter().all(|t| allowed.contains(&t.as_str())),
            "{kind}: the GGUF tokenizer differs on {gguf_differs:?}"
        );
    }
}

/// Our GGUF export of every family, read back: llama.cpp's architecture names and tensor
/// conventions (the `llama` q/k permutation, Gemma's `1 +` on norms, Phi-3's fused tensors and
/// RoPE factors, Llama 3's `rope_freqs`) round-trip, so the reloaded F16 file answers as the
/// model did, within f16 rounding. (Gemma's files are read with llama.cpp's attention scale,
/// which GGUF cannot override: the export warns when the model's differs, as the fixtures'
/// does, so Gemma is compared with the converter's file of the same weights instead.)
#[test]
fn gguf_exports_of_every_family_read_back() {
    for family in ["llama3", "qwen2", "qwen3", "phi3", "gemma2"] {
        let model = load(family);
        let tokenizer = peft_prelude::tokenizer::Tokenizer::from_file(fixture(&format!(
            "families/{family}/tokenizer.json"
        )))
        .unwrap();
        let dir = std::env::temp_dir().join(format!("peft-gguf-{family}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.F16.gguf");
        peft_prelude::quant::export::save_gguf(
            &model,
            &path,
            peft_prelude::quant::export::GgufExport::F16,
            &tokenizer,
        )
        .unwrap_or_else(|e| panic!("{family}: {e}"));
        let back = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap();
        let x = ids(&reference(family), "a.input_ids");
        let got = back.model.forward(&x).unwrap();
        let want = match family {
            "gemma2" => load_gguf(family, "model-f32.gguf")
                .model
                .forward(&x)
                .unwrap(),
            _ => model.forward(&x).unwrap(),
        };
        let diff = max_abs_diff(&got, &want);
        eprintln!("{family}: F16 export read back, max |diff| {diff:e}");
        assert!(
            diff < 2e-2,
            "{family}: the exported GGUF answers {diff} away"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The families' official chat templates (Llama 3.1 and 3.2 with their tools branches and
/// `strftime_now` date, Gemma 2 and 3 with `raise_exception` on role order, Qwen 2.5 and 3 with
/// thinking, Phi-3) render as transformers renders them, at the instant the fixture pinned,
/// errors included. Cases whose messages carry more than a role and a text (tool calls,
/// structured content) or whose tool schemas need key order kept are left to later: a
/// `ChatMessage` holds a role and a string, and our JSON maps sort their keys.
#[test]
fn family_chat_templates_render_as_transformers() {
    use peft_prelude::tokenizer::{ChatMessage, Tokenizer};
    let all = peft_tests::json_fixture("families/chat_templates.json");
    // The instant transformers rendered at (what `strftime_now` returns).
    std::env::set_var(
        "SOURCE_DATE_EPOCH",
        all["now_unix"].as_u64().unwrap().to_string(),
    );
    // A tokenizer without special tokens of its own: each case brings its bos and eos.
    let base = Tokenizer::from_file(fixture("families/qwen2/tokenizer.json")).unwrap();
    let mut checked = 0;
    for (name, t) in all["templates"].as_object().unwrap() {
        let mut tok = base.clone();
        tok.set_chat_template(t["chat_template"].as_str().unwrap());
        for case in t["cases"].as_array().unwrap() {
            if !case["plain_messages"].as_bool().unwrap_or(false)
                || case["key_order_sensitive"].as_bool().unwrap_or(false)
            {
                continue;
            }
            let messages: Vec<ChatMessage> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
                })
                .collect();
            let mut extra = serde_json::Map::new();
            if let Some(kwargs) = case["kwargs"].as_object() {
                extra.extend(kwargs.clone());
            }
            if let Some(tools) = case.get("tools") {
                extra.insert("tools".into(), tools.clone());
            }
            for token in ["bos_token", "eos_token"] {
                if let Some(s) = case[token].as_str() {
                    extra.insert(token.into(), s.into());
                }
            }
            let generation = case["add_generation_prompt"].as_bool().unwrap();
            let got = tok.apply_chat_template_with(&messages, generation, &extra);
            let what = format!("{name} / {}", case["name"]);
            match case["error"].as_str() {
                Some(error) => {
                    let msg = got.expect_err(&what).to_string();
                    assert!(msg.contains(error), "{what}: {msg}");
                }
                None => assert_eq!(
                    got.unwrap_or_else(|e| panic!("{what}: {e}")),
                    case["rendered"].as_str().unwrap(),
                    "{what}"
                ),
            }
            checked += 1;
        }
    }
    assert!(checked >= 60, "only {checked} cases checked");
}
