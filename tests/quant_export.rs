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
use peft_tests::{f16_rounded, fixture, max_abs_diff, tensors};

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

/// The model with its projections and embeddings rounded through f16 (what a 16-bit export holds).
fn rounded_to_f16(mut m: Model) -> Model {
    let round = f16_rounded;
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
    // The tokenizer, with a chat template: the export writes it out whatever it was loaded
    // from.
    let mut tokenizer = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default())
        .unwrap()
        .tokenizer;
    tokenizer
        .set_chat_template("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}");
    let dir = temp("hf16");
    save_hf_16bit(&model, &dir, DType::F16, &tokenizer).unwrap();
    let mut written: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
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
        let expected = f16_rounded(&w);
        assert_eq!(
            max_abs_diff(
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
    let d = max_abs_diff(&got, &model.forward(&ids()).unwrap());
    println!("16-bit safetensors export, reloaded vs merged model: max logit diff {d:e}");
    assert!(d < 0.02, "{d}");
    let d = max_abs_diff(&got, &rounded_to_f16(model).forward(&ids()).unwrap());
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

/// The tensor types of a GGUF file, by name.
fn tensor_types(path: &std::path::Path) -> std::collections::HashMap<String, GgmlDType> {
    GgufFile::open(path)
        .unwrap()
        .content()
        .tensor_infos
        .iter()
        .map(|(k, v)| (k.clone(), v.ggml_dtype))
        .collect()
}

#[test]
fn merged_model_exports_as_gguf_and_loads_back() {
    let source = fixture("gguf/tiny-mistral-f32.gguf");
    let loaded = Pretrained::from_gguf(&source, &LoadOptions::default()).unwrap();
    let model = merged(loaded.model);
    let merged_logits = model.forward(&ids()).unwrap();
    for (kind, tol) in [
        (GgufExport::F16, 0.01),
        (GgufExport::Q8_0, 0.2),
        (GgufExport::Q4KM, 2.0),
    ] {
        let name = kind.name();
        let path = temp(&format!("merged-{name}.gguf"));
        save_gguf(&model, &path, kind, &loaded.tokenizer).unwrap();
        let types = tensor_types(&path);
        let back = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap();
        // Every projection reads back as exactly the merged weight in the file's type, q/k
        // included (permuted on write, un-permuted on read).
        for (p, gguf_name) in [
            ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
            ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight"),
            ("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight"),
            ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"),
        ] {
            let w = model.linear(p).unwrap().base().dense_weight().unwrap();
            let expected = QTensor::quantize(&w, types[gguf_name])
                .unwrap()
                .dequantize(&candle_core::Device::Cpu)
                .unwrap();
            let got = back.model.linear(p).unwrap().base().dense_weight().unwrap();
            assert_eq!(max_abs_diff(&got, &expected), 0.0, "{name} {p}");
        }
        let d = max_abs_diff(&back.model.forward(&ids()).unwrap(), &merged_logits);
        println!("GGUF {name} export, reloaded vs merged model: max logit diff {d:e}");
        assert!(d < tol, "{name}: {d}");
        assert_eq!(
            back.tokenizer.encode("Hello world", true).unwrap()[0],
            1,
            "tokenizer came along"
        );
    }
    // Q4_K_M's mix on 64/160-wide rows (not multiples of 256): Q4_K falls back to Q5_0, the
    // Q6_K of the last layer's value/down projections and of the head to Q8_0, as llama.cpp
    // falls back.
    let types = tensor_types(&temp("merged-Q4_K_M.gguf"));
    assert_eq!(types["blk.0.attn_q.weight"], GgmlDType::Q5_0);
    assert_eq!(types["blk.0.attn_v.weight"], GgmlDType::Q5_0);
    assert_eq!(types["blk.1.attn_v.weight"], GgmlDType::Q8_0);
    assert_eq!(types["blk.1.ffn_down.weight"], GgmlDType::Q8_0);
    assert_eq!(types["output.weight"], GgmlDType::Q8_0);
    // F16 holds exactly the f16-rounded merged model.
    let path = temp("merged-F16.gguf");
    let back = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap();
    let d = max_abs_diff(
        &back.model.forward(&ids()).unwrap(),
        &rounded_to_f16(model).forward(&ids()).unwrap(),
    );
    assert!(d < 1e-4, "{d}");
}

/// Every weight of a Q8_0 export, read back both ways (dequantized at load, and kept in Q8_0
/// as decoding reads it), is within half a quantization step of the weight it came from: per
/// block of 32, step d = amax / 127, stored as f16 (whose rounding may add up to 127 · |d − f16(d)|).
/// A writer or reader that mixed up blocks, scales or signs fails this (the round trip
/// through candle's own quantizer would not notice a quantizer bug).
#[test]
fn q8_0_export_is_within_half_a_step_of_every_weight() {
    use peft_prelude::quant::Quantization;
    let source = fixture("gguf/tiny-mistral-f32.gguf");
    let loaded = Pretrained::from_gguf(&source, &LoadOptions::default()).unwrap();
    let model = merged(loaded.model);
    let path = temp("bound-q8_0.gguf");
    save_gguf(&model, &path, GgufExport::Q8_0, &loaded.tokenizer).unwrap();
    let within_bound = |what: &str, original: &Tensor, read: &Tensor| {
        let (rows, cols) = original.dims2().unwrap();
        assert_eq!(read.dims2().unwrap(), (rows, cols), "{what}");
        let w = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r = read.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = 0f32;
        for (bw, br) in w.chunks(32).zip(r.chunks(32)) {
            let amax = bw.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 127.0;
            let d16 = half_round(d);
            let bound = d / 2.0 + 127.0 * (d - d16).abs() + 1e-7;
            for (x, y) in bw.iter().zip(br) {
                worst = worst.max((x - y).abs() / bound);
            }
        }
        assert!(worst <= 1.0, "{what}: an error of {worst} bounds");
        worst
    };
    for quantization in [Quantization::None, Quantization::KeepGguf] {
        let back = Pretrained::from_gguf(
            &path,
            &LoadOptions::default().with_quantization(quantization),
        )
        .unwrap();
        let mut worst = 0f32;
        for p in model.linear_paths() {
            if p == "lm_head" && quantization == Quantization::KeepGguf {
                continue; // kept dense when untied (only a tied head is read from the file)
            }
            let w = model.linear(&p).unwrap().base().dense_weight().unwrap();
            let r = back
                .model
                .linear(&p)
                .unwrap()
                .base()
                .dense_weight()
                .unwrap();
            worst = worst.max(within_bound(&p, &w, &r));
        }
        worst = worst.max(within_bound(
            "embed_tokens",
            model.embed_tokens(),
            back.model.embed_tokens(),
        ));
        println!("Q8_0 export read back ({quantization:?}): largest error {worst:.3} of the rounding bound");
    }
}

/// `x` rounded to f16 and back.
fn half_round(x: f32) -> f32 {
    f16_rounded(&Tensor::new(&[x], &candle_core::Device::Cpu).unwrap())
        .to_vec1::<f32>()
        .unwrap()[0]
}
