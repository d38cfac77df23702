//! Merged models exported for other runtimes load back through our own loaders with the
//! merged model's logits: 16-bit Hugging Face safetensors (from a 4-bit QLoRA merge) and GGUF
//! F16 / Q8_0 / Q4_K (q/k rows permuted back to llama.cpp's order, tokenizer in the metadata).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use peft_prelude::model::gguf::GgufFile;
use peft_prelude::model::{FrozenLinear, LoadOptions, Model, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig, LoraInit};
use peft_prelude::quant::export::{save_gguf, save_hf_16bit, GgufExport};
use peft_prelude::tokenizer::ChatMessage;
use peft_tests::{fixture, tensors};

fn ids() -> Tensor {
    tensors("gguf/reference.safetensors")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
}

fn merged(model: Model) -> Model {
    let mut config = LoraConfig::all_projections(4, 8.0);
    config.init_lora_weights = LoraInit::Bool(false);
    get_peft_model(model, config)
        .unwrap()
        .merge_and_unload()
        .unwrap()
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

/// The model with its projections and embeddings rounded through f16 (what a 16-bit export holds).
fn rounded_to_f16(mut m: Model) -> Model {
    let round = |t: &Tensor| {
        t.to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    for p in m.linear_paths() {
        let w = round(&m.linear(&p).unwrap().base().dense_weight().unwrap());
        m.replace_linear(&p, |_| Ok(Box::new(FrozenLinear::new(w, None))))
            .unwrap();
    }
    let e = round(m.embed_tokens());
    m.set_embed_tokens(e).unwrap();
    m
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("peft-quant-export-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn qlora_merge_exports_as_16bit_safetensors_and_loads_back() {
    let model = merged(
        peft_prelude::model::load::load_model_from_dir(
            fixture("tiny-mistral"),
            &LoadOptions::load_in_4bit(),
        )
        .unwrap(),
    );
    assert!(model
        .linear("model.layers.0.mlp.up_proj")
        .unwrap()
        .base()
        .is_quantized());
    // The tokenizer files, plus a chat template the way transformers 5 stores it.
    let tokenizer_dir = temp("hf16-tokenizer");
    std::fs::create_dir_all(&tokenizer_dir).unwrap();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture("tiny-mistral").join(name), tokenizer_dir.join(name)).unwrap();
    }
    std::fs::write(
        tokenizer_dir.join("chat_template.jinja"),
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let dir = temp("hf16");
    save_hf_16bit(&model, &dir, DType::F16, &tokenizer_dir).unwrap();
    let mut written: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ],
        "every file in place, no temporary left behind"
    );
    let back = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap();
    assert!(!back
        .model
        .linear("model.layers.0.mlp.up_proj")
        .unwrap()
        .base()
        .is_quantized());
    // Every projection is the merged (dequantized) weight rounded to f16.
    for p in model.linear_paths() {
        let w = model.linear(&p).unwrap().base().dense_weight().unwrap();
        let expected = w
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(
            max_diff(
                &back
                    .model
                    .linear(&p)
                    .unwrap()
                    .base()
                    .dense_weight()
                    .unwrap(),
                &expected
            ),
            0.0,
            "{p}"
        );
    }
    // Logits differ only by f16 rounding (of the norms too).
    let got = back.model.forward(&ids()).unwrap();
    let d = max_diff(&got, &model.forward(&ids()).unwrap());
    println!("16-bit safetensors export, reloaded vs merged model: max logit diff {d:e}");
    assert!(d < 0.02, "{d}");
    let d = max_diff(&got, &rounded_to_f16(model).forward(&ids()).unwrap());
    println!("  vs merged model with projections and embeddings rounded to f16: {d:e}");
    assert!(d < 0.01, "{d}");
    assert_eq!(
        back.tokenizer.encode("Hello world", true).unwrap()[0],
        1,
        "tokenizer came along"
    );
    assert_eq!(
        back.tokenizer
            .apply_chat_template(&[ChatMessage::new("user", "Hi")], false)
            .unwrap(),
        "<|user|>Hi",
        "the chat template came along"
    );
}

#[test]
fn merged_model_exports_as_gguf_and_loads_back() {
    let source = fixture("gguf/tiny-mistral-f32.gguf");
    let tokenizer_from = GgufFile::open(&source).unwrap();
    let base = Pretrained::from_gguf(&source, &LoadOptions::default())
        .unwrap()
        .model;
    let model = merged(base);
    let merged_logits = model.forward(&ids()).unwrap();
    for (kind, name, proj_type, tol) in [
        (GgufExport::F16, "f16", GgmlDType::F16, 0.01),
        (GgufExport::Q8_0, "q8_0", GgmlDType::Q8_0, 0.2),
        // 64 and 160 wide rows are not multiples of 256: Q5_0, as llama.cpp falls back.
        (GgufExport::Q4K, "q4_k", GgmlDType::Q5_0, 2.0),
    ] {
        let path = temp(&format!("merged-{name}.gguf"));
        save_gguf(&model, &path, kind, &tokenizer_from).unwrap();
        let back = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap();
        // Every projection reads back as exactly the merged weight in the file's type, q/k
        // included (permuted on write, un-permuted on read).
        for p in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj",
            "model.layers.1.mlp.down_proj",
        ] {
            let w = model.linear(p).unwrap().base().dense_weight().unwrap();
            let expected = QTensor::quantize(&w, proj_type)
                .unwrap()
                .dequantize(&candle_core::Device::Cpu)
                .unwrap();
            let got = back.model.linear(p).unwrap().base().dense_weight().unwrap();
            assert_eq!(max_diff(&got, &expected), 0.0, "{name} {p}");
        }
        let d = max_diff(&back.model.forward(&ids()).unwrap(), &merged_logits);
        println!("GGUF {name} export, reloaded vs merged model: max logit diff {d:e}");
        assert!(d < tol, "{name}: {d}");
        assert_eq!(
            back.tokenizer.encode("Hello world", true).unwrap()[0],
            1,
            "tokenizer came along"
        );
    }
    // F16 holds exactly the f16-rounded merged model.
    let path = temp("merged-f16.gguf");
    let back = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap();
    let d = max_diff(
        &back.model.forward(&ids()).unwrap(),
        &rounded_to_f16(model).forward(&ids()).unwrap(),
    );
    assert!(d < 1e-4, "{d}");
}
