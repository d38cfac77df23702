//! GGUF-quantized projections kept quantized as the frozen base: the logits of the file's own
//! reference (within the error of candle's Q8 activation quantization), LoRA gradients against
//! the same weights run dense, and q/k rows un-permuted on the quantized data.

use candle_core::{DType, Tensor};
use peft_prelude::model::{FrozenLinear, LoadOptions, Model, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig, LoraInit};
use peft_prelude::quant::Quantization;
use peft_prelude::train::causal_lm_loss;
use peft_tests::{assert_logits_match, fixture, tensors};

fn keep(file: &str) -> Model {
    keep_path(&fixture(&format!("gguf/{file}")))
}

fn keep_path(path: &std::path::Path) -> Model {
    let options = LoadOptions::default().with_quantization(Quantization::KeepGguf);
    Pretrained::from_gguf(path, &options).unwrap().model
}

/// The tiny model exported as Q4_K_M by us: its 64- and 160-wide rows are no multiple of 256,
/// so most projections fall back to Q5_0 (and a few to Q8_0), as llama.cpp's do.
fn q4_k_m_export() -> std::path::PathBuf {
    use peft_prelude::quant::export::{save_gguf, GgufExport};
    let source = fixture("gguf/tiny-mistral-f32.gguf");
    let loaded = Pretrained::from_gguf(&source, &LoadOptions::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("peft-quant-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-mistral-Q4_K_M.gguf");
    save_gguf(&loaded.model, &path, GgufExport::Q4KM, &loaded.tokenizer).unwrap();
    path
}

fn dense(file: &str) -> Model {
    Pretrained::from_gguf(fixture(&format!("gguf/{file}")), &LoadOptions::default())
        .unwrap()
        .model
}

fn ids() -> Tensor {
    tensors("gguf/reference.safetensors")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
}

#[test]
fn quantized_projections_keep_their_type_and_give_the_reference_logits() {
    let r = tensors("gguf/reference.safetensors");
    // candle's quantized matmul rounds the activations to Q8 blocks: a small, bounded error.
    for (file, key, format, tol) in [
        ("tiny-mistral-q8_0.gguf", "q8_0", "Q8_0", 0.1),
        ("tiny-mistral-q4_0.gguf", "q4_0", "Q4_0", 0.1),
    ] {
        let model = keep(file);
        let q = model
            .linear("model.layers.0.self_attn.q_proj")
            .unwrap()
            .base();
        assert_eq!(
            q.quantized_weight().map(|w| w.format()),
            Some(format.to_string()),
            "{file}"
        );
        // Un-permuting the quantized rows gives the same weight as un-permuting the dense one.
        let reference = dense(file);
        for p in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj",
        ] {
            let a = model.linear(p).unwrap().base().dense_weight().unwrap();
            let b = reference.linear(p).unwrap().base().dense_weight().unwrap();
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{file} {p}");
        }
        // The dense path reproduces the file's reference; the quantized one stays close to it
        // (argmax may flip where the top two logits are close, as in llama.cpp).
        let expected = reference.forward(&ids()).unwrap();
        assert_logits_match(&expected, &r, &format!("{key}.full_causal"), None, 1e-4);
        let logits = model.forward(&ids()).unwrap();
        let worst = (&logits - &expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("{file}: kept quantized vs dequantized dense, max logit diff {worst:e}");
        assert!(worst < tol, "{file}: {worst}");
    }
}

#[test]
fn lora_gradients_on_a_gguf_base_match_the_dense_base() {
    let file = "tiny-mistral-q8_0.gguf";
    let mut config = LoraConfig::all_projections(4, 8.0);
    config.init_lora_weights = LoraInit::Bool(false);
    let quantized = get_peft_model(keep(file), config.clone()).unwrap();
    let mut base = keep(file);
    for p in base.linear_paths() {
        let w = base.linear(&p).unwrap().base().dense_weight().unwrap();
        base.replace_linear(&p, |_| Ok(Box::new(FrozenLinear::new(w, None))))
            .unwrap();
    }
    let dense = get_peft_model(base, config).unwrap();
    let labels = ids().to_dtype(DType::I64).unwrap();
    let (lq, _) = causal_lm_loss(&quantized.forward(&ids()).unwrap(), &labels).unwrap();
    let (ld, _) = causal_lm_loss(&dense.forward(&ids()).unwrap(), &labels).unwrap();
    let (gq, gd) = (lq.backward().unwrap(), ld.backward().unwrap());
    let mut worst = 0f32;
    let mut scale = 0f32;
    for ((n, q), (_, d)) in quantized
        .trainable_vars()
        .iter()
        .zip(&dense.trainable_vars())
    {
        let a = gq
            .get(q.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {n}"));
        let b = gd.get(d.as_tensor()).unwrap();
        worst = worst.max(
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
        scale = scale.max(
            b.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
    }
    println!("LoRA gradients, Q8_0 base vs dense: max diff {worst:e} (largest gradient {scale:e})");
    // Only the forward's Q8 activation rounding separates them.
    assert!(worst < 0.02 * scale, "{worst} vs {scale}");
}

/// Our decoding kernel reads each block format the way candle (and so GGML) lays it out: a
/// weight quantized by candle, run through `GgmlWeight`'s few-row path, equals candle's own
/// quantized matmul (both round the activations to 8 bits per block of 32, GGML's way; for the
/// K types candle rounds per 256) up to the precision of the activation scales, and the dense
/// product within that rounding.
#[test]
fn the_decoding_kernel_reads_every_block_format_as_candle_writes_it() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;
    use peft_prelude::quant::{GgmlWeight, QuantizedWeight};
    let dev = Device::Cpu;
    let (n, k) = (70, 256);
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let candle = x.apply_op1_no_bwd(&q).unwrap().to_vec2::<f32>().unwrap();
        let dense_w = q.dequantize(&dev).unwrap();
        let dense = x.matmul(&dense_w.t().unwrap()).unwrap();
        let dense = dense.to_vec2::<f32>().unwrap();
        let ours = GgmlWeight::new(q, DType::F32).unwrap();
        assert!(
            ours.block_format().is_some() || ours.super_format().is_some(),
            "{dtype:?} runs on our kernel"
        );
        // The K types' activations: candle rounds them to 8 bits per 256 (GGML's Q8_K), we
        // per 32, so the two differ by candle's coarser rounding; both stay within it of the
        // dense product.
        let k_type = ours.super_format().is_some();
        let got = ours.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let (wd, xs) = (
            dense_w.to_vec2::<f32>().unwrap(),
            x.to_vec2::<f32>().unwrap(),
        );
        for o in 0..n {
            let (g, c, d) = (got[0][o], candle[0][o], dense[0][o]);
            // candle keeps each activation block's scale in f16 (as GGML's Q8 blocks do), we
            // in f32: a relative 2^-11 of each block's share, far below what a misread bit of
            // a weight would move.
            let scale: f32 = (0..k).map(|i| (wd[o][i] * xs[0][i]).abs()).sum();
            let tolerance = if k_type { 1e-2 } else { 1e-3 };
            assert!(
                (g - c).abs() <= tolerance * (1.0 + scale),
                "{dtype:?} output {o}: ours {g}, candle's {c}"
            );
            assert!(
                (g - d).abs() <= 0.5,
                "{dtype:?} output {o}: ours {g}, dense {d}"
            );
        }
    }
}

/// Decoding with the KV cache, one token at a time, runs the kept projections through the
/// row kernels: on a CPU with AVX-512 VNNI or AVX2 the Q4_0, Q5_0 and Q8_0 layers are
/// regrouped into 16-row tiles and a layer's q, k and v (and gate and up) share one call.
/// Every step's logits must match the full forward of the same model (whose prompt-sized
/// batch takes the dequantized GEMM path) within the error of rounding the activations to 8
/// bits. The Q4_K_M file is our own export (mostly Q5_0 here).
#[test]
fn cached_decoding_on_a_kept_base_matches_the_full_forward() {
    use peft_prelude::model::Forward;
    use peft_prelude::quant::GgmlWeight;
    let files = [
        fixture("gguf/tiny-mistral-q8_0.gguf"),
        fixture("gguf/tiny-mistral-q4_0.gguf"),
        q4_k_m_export(),
    ];
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy();
        let model = keep_path(path);
        let q = model
            .linear("model.layers.0.self_attn.q_proj")
            .unwrap()
            .base()
            .quantized_weight()
            .unwrap()
            .clone();
        let tiled = q
            .as_any()
            .downcast_ref::<GgmlWeight>()
            .is_some_and(|g| g.is_tiled());
        println!("{file}: q_proj {}, tiled: {tiled}", q.format());
        if file.contains("Q4_K_M") {
            assert_eq!(q.format(), "Q5_0", "{file}");
        }
        let ids = ids().narrow(0, 0, 1).unwrap();
        let t = ids.dim(1).unwrap();
        let full = model.forward(&ids).unwrap();
        let mut cache = model.new_cache();
        for i in 0..t {
            let step = ids.narrow(1, i, 1).unwrap();
            let logits = model
                .forward_last(Forward::ids(&step).with_cache(&mut cache))
                .unwrap();
            let want = full.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
            let diff = peft_tests::max_abs_diff(&logits, &want);
            assert!(
                diff < 0.1,
                "{file} step {i}: cached decoding differs by {diff}"
            );
        }
    }
}
