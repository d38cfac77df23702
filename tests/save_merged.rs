//! Unsloth's one-call saves on the tiny fixtures: `save_pretrained_merged` (merged_16bit,
//! merged_4bit, lora), `save_pretrained_gguf` (f16, q8_0, q4_k_m) and
//! `Tokenizer::save_pretrained`, each reloaded and compared with the adapter model it came
//! from. The defect they guard against: the notebook's merged model (an NF4 base re-quantized
//! after `merge_and_unload`) answered differently from the adapter model, and so did the
//! 16-bit export made from it.

use candle_core::{DType, Tensor};
use peft_prelude::model::{CausalLm, Forward, FrozenLinear, LoadOptions, Model, Pretrained};
use peft_prelude::peft::{
    get_peft_model, LoraConfig, LoraInit, PeftModel, PromptLearningCommon, PromptTuningConfig,
};
use peft_prelude::quant::Quantization;
use peft_prelude::tokenizer::{ChatMessage, Tokenizer};
use peft_tests::{f16_rounded, fixture, json_fixture, max_abs_diff, tensors};

fn ids() -> Tensor {
    tensors("gguf/reference.safetensors")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("peft-save-merged-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// The tiny Mistral with its projections in NF4 (the notebook's `load_in_4bit`) and a LoRA
/// adapter on all seven projections whose B is not zero (as if trained).
fn qlora_model() -> (PeftModel, Tokenizer) {
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::load_in_4bit()).unwrap();
    let mut config = LoraConfig::all_projections(8, 16.0);
    config.init_lora_weights = LoraInit::Bool(false);
    let peft = get_peft_model(p.model, config).unwrap();
    let mut tokenizer = p.tokenizer;
    tokenizer
        .set_chat_template("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}");
    (peft, tokenizer)
}

fn logits(model: &dyn CausalLm) -> Tensor {
    model.logits(Forward::ids(&ids())).unwrap()
}

/// The test strings of the tokenizer fixtures.
fn test_strings() -> Vec<String> {
    json_fixture("tokenizer/encodings.json")["strings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect()
}

fn assert_same_ids(a: &Tokenizer, b: &Tokenizer, what: &str) {
    for text in test_strings() {
        for special in [false, true] {
            assert_eq!(
                a.encode(&text, special).unwrap(),
                b.encode(&text, special).unwrap(),
                "{what}: {text:?} (special tokens {special})"
            );
        }
    }
    assert_eq!(a.bos_token_id(), b.bos_token_id(), "{what}: BOS");
    assert_eq!(a.eos_token_id(), b.eos_token_id(), "{what}: EOS");
    let chat = [
        ChatMessage::user("Hi there"),
        ChatMessage::assistant("Hello!"),
    ];
    assert_eq!(
        a.apply_chat_template(&chat, true).ok(),
        b.apply_chat_template(&chat, true).ok(),
        "{what}: chat template"
    );
}

/// The merge itself is exact (f32 over the dequantized base: within 1e-4 of the adapter
/// model's logits, ~1e-6 in fact), and the 16-bit file holds exactly that merge rounded to
/// f16, element for element; its logits then differ from the adapter model's only by that
/// rounding, while PEFT's re-quantizing `merge_and_unload` is hundreds of times further off.
#[test]
fn merged_16bit_is_the_exact_merge_rounded_once() {
    let (peft, tokenizer) = qlora_model();
    let adapter = logits(&peft);
    let dir = temp("merged_16bit");
    peft.save_pretrained_merged(&dir, &tokenizer, "merged_16bit")
        .unwrap();
    let back = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap();
    assert!(
        !back
            .model
            .linear("model.layers.0.mlp.up_proj")
            .unwrap()
            .base()
            .is_quantized(),
        "a 16-bit checkpoint"
    );
    // The merge in f32: the NF4 base dequantized plus s·B·A, as a model of its own.
    let source = peft.merged_source().unwrap();
    let mut exact = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::load_in_4bit())
        .unwrap()
        .model;
    for p in exact.linear_paths() {
        let w = source.linear_weight(&p).unwrap();
        assert_eq!(w.dtype(), DType::F32, "{p}: merged in f32");
        // The file holds exactly this, rounded to f16.
        let stored = back
            .model
            .linear(&p)
            .unwrap()
            .base()
            .dense_weight()
            .unwrap();
        let rounded = f16_rounded(&w);
        assert_eq!(max_abs_diff(&stored, &rounded), 0.0, "{p}: stored weight");
        exact
            .replace_linear(&p, |_| Ok(Box::new(FrozenLinear::new(w, None))))
            .unwrap();
    }
    let merge = max_abs_diff(&logits(&exact), &adapter);
    let merged16 = max_abs_diff(&logits(&back.model), &adapter);
    // PEFT's merge_and_unload on the 4-bit base re-quantizes the sum into NF4.
    let requantized = max_abs_diff(
        &logits(&qlora_model().0.merge_and_unload().unwrap()),
        &adapter,
    );
    eprintln!(
        "vs the adapter model's logits: the merge in f32 {merge:e}; merged_16bit reloaded \
         {merged16:e} (f16 rounding); merge_and_unload (NF4 re-quantized) {requantized:e}"
    );
    assert!(
        merge < 1e-4,
        "the f32 merge is {merge} from the adapter model"
    );
    assert!(
        merged16 < 2e-2,
        "merged_16bit is {merged16} from the adapter model"
    );
    assert!(
        requantized > 100.0 * merged16,
        "re-quantizing is not the far larger error ({requantized} vs {merged16})"
    );
    // The model is untouched by the save, and the export is self-contained.
    assert_eq!(max_abs_diff(&logits(&peft), &adapter), 0.0);
    assert_same_ids(&tokenizer, &back.tokenizer, "merged_16bit tokenizer");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float16");
    assert!(dir.join("generation_config.json").is_file());
}

#[test]
fn merged_4bit_reloads_as_the_requantized_merge() {
    let (peft, tokenizer) = qlora_model();
    let dir = temp("merged_4bit");
    peft.save_pretrained_merged(&dir, &tokenizer, "merged_4bit")
        .unwrap();
    let back = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap();
    let layer = back
        .model
        .linear("model.layers.1.self_attn.k_proj")
        .unwrap();
    assert_eq!(
        layer.base().quantized_weight().map(|q| q.format()),
        Some("nf4 (double quant)".to_string()),
        "a bitsandbytes NF4 checkpoint"
    );
    // The same as PEFT's merge into the 4-bit layers: the sum quantized to NF4 again.
    let requantized = qlora_model().0.merge_and_unload().unwrap();
    let d = max_abs_diff(&logits(&back.model), &logits(&requantized));
    eprintln!("merged_4bit reloaded vs merge_and_unload: {d:e}");
    assert!(d < 1e-5, "{d}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    assert_eq!(
        config["quantization_config"]["bnb_4bit_use_double_quant"],
        true
    );
}

#[test]
fn lora_method_saves_the_adapter_with_the_tokenizer() {
    let (peft, tokenizer) = qlora_model();
    let dir = temp("lora");
    peft.save_pretrained_merged(&dir, &tokenizer, "lora")
        .unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let base = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::load_in_4bit())
        .unwrap()
        .model;
    let reloaded = PeftModel::from_pretrained(base, &dir).unwrap();
    assert_eq!(max_abs_diff(&logits(&reloaded), &logits(&peft)), 0.0);
    assert_same_ids(
        &tokenizer,
        &Tokenizer::from_file(&dir).unwrap(),
        "lora tokenizer",
    );
}

#[test]
fn unknown_methods_and_unmergeable_adapters_are_refused() {
    let (peft, tokenizer) = qlora_model();
    let err = peft
        .save_pretrained_merged(temp("x"), &tokenizer, "merged_8bit")
        .unwrap_err();
    assert!(
        err.to_string().contains("merged_16bit, merged_4bit, lora"),
        "{err}"
    );
    let err = peft
        .save_pretrained_gguf(temp("y"), &tokenizer, "q3_k_s")
        .unwrap_err();
    assert!(err.to_string().contains("f16, q8_0, q4_k_m"), "{err}");

    let base = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let prompt = get_peft_model(
        base.model,
        PromptTuningConfig {
            prompt: PromptLearningCommon {
                num_virtual_tokens: 4,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let err = prompt
        .save_pretrained_merged(temp("z"), &base.tokenizer, "merged_16bit")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("PROMPT_TUNING adapters cannot be merged"),
        "{err}"
    );
    prompt
        .save_pretrained_merged(temp("z"), &base.tokenizer, "lora")
        .expect("the adapter itself saves");
}

/// A GGUF from a Hugging Face directory: the tokenizer's metadata is derived from
/// tokenizer.json (SentencePiece BPE: scores that rebuild the merges), and the merged weights
/// come out in each type within its rounding.
#[test]
fn gguf_from_a_hugging_face_directory() {
    let (mut peft, tokenizer) = qlora_model();
    // GGUF's llama architecture has no sliding window (the export warns): compare with the
    // model run without one.
    peft.model_mut().set_sliding_window(None);
    let adapter = logits(&peft);
    for (method, tol) in [("f16", 0.02), ("q8_0", 0.3), ("q4_k_m", 2.0)] {
        let dir = temp(&format!("gguf-{method}"));
        let path = peft.save_pretrained_gguf(&dir, &tokenizer, method).unwrap();
        assert!(path.starts_with(&dir) && path.extension().unwrap() == "gguf");
        for quantization in [Quantization::None, Quantization::KeepGguf] {
            let back = Pretrained::from_gguf(
                &path,
                &LoadOptions::default().with_quantization(quantization),
            )
            .unwrap();
            let d = max_abs_diff(&logits(&back.model), &adapter);
            eprintln!("save_pretrained_gguf {method} ({quantization:?}) vs adapter model: {d:e}");
            assert!(d < tol, "{method} {quantization:?}: {d}");
            assert_same_ids(&tokenizer, &back.tokenizer, &format!("gguf {method}"));
        }
    }
}

/// `Tokenizer::save_pretrained` and the GGUF metadata, both ways, for both tokenizer kinds:
/// SentencePiece BPE from tokenizer.json (tiny Mistral) and byte-level BPE from a GGUF
/// (SmolLM2), the latter also through tokenizer.json and back into GGUF metadata.
#[test]
fn tokenizers_round_trip_through_tokenizer_json_and_gguf_metadata() {
    use candle_core::quantized::gguf_file::{Content, VersionedMagic};
    let through_gguf = |tok: &Tokenizer| {
        let content = Content {
            magic: VersionedMagic::GgufV3,
            metadata: tok.gguf_metadata().unwrap().into_iter().collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        Tokenizer::from_gguf(&content, std::path::Path::new("memory.gguf")).unwrap()
    };
    let through_json = |tok: &Tokenizer, name: &str| {
        let dir = temp(name);
        tok.save_pretrained(&dir).unwrap();
        Tokenizer::from_file(&dir).unwrap()
    };

    let mistral = qlora_model().1;
    assert_same_ids(
        &mistral,
        &through_json(&mistral, "tok-mistral"),
        "mistral → json",
    );
    assert_same_ids(&mistral, &through_gguf(&mistral), "mistral → gguf");

    let smollm2 = Tokenizer::from_gguf_file(peft_tests::smollm2_gguf()).unwrap();
    assert!(smollm2.chat_template().is_some());
    let json = through_json(&smollm2, "tok-smollm2");
    assert_same_ids(&smollm2, &json, "smollm2 → json");
    assert_same_ids(&smollm2, &through_gguf(&smollm2), "smollm2 → gguf");
    // tokenizer.json → derived metadata (pre-tokenizer recognised as `smollm`).
    let derived = json.gguf_metadata().unwrap();
    let pre = derived
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.pre")
        .map(|(_, v)| v.to_string().unwrap().clone());
    assert_eq!(pre.as_deref(), Some("smollm"));
    assert_same_ids(&smollm2, &through_gguf(&json), "smollm2 → json → gguf");
}

/// A plain `Model` exports through `save_hf_16bit` and `save_gguf` with its tokenizer.
#[test]
fn a_plain_model_exports_too() {
    use peft_prelude::quant::export::{save_gguf, save_hf_16bit, GgufExport};
    let mut p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    p.model.set_sliding_window(None);
    let model: &Model = &p.model;
    let dir = temp("plain16");
    save_hf_16bit(model, &dir, DType::BF16, &p.tokenizer).unwrap();
    let back = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap();
    assert!(max_abs_diff(&logits(&back.model), &logits(model)) < 0.1);
    let path = temp("plain.gguf");
    save_gguf(model, &path, GgufExport::Q8_0, &p.tokenizer).unwrap();
    let back = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap();
    assert!(max_abs_diff(&logits(&back.model), &logits(model)) < 0.3);
}
