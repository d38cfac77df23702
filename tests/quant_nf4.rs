//! NF4 against bitsandbytes: the quantizer bit for bit (packed codes, absmax, nested
//! statistics, dequantized values), the tiny Mistral's bnb-4bit checkpoint (logits), a QLoRA
//! forward and LoRA gradients against the same model run dense, load_in_4bit, merging into
//! the 4-bit base, and bad checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use peft_tests::{max_abs, max_abs_diff};

use candle_core::{DType, Device, Tensor};

use peft_prelude::data::collate::Batch;
use peft_prelude::model::load::load_model_from_dir;
use peft_prelude::model::weights::{SafetensorsSource, WeightSource};
use peft_prelude::model::{Forward, FrozenLinear, LoadOptions, Model};
use peft_prelude::peft::lora::LoraLinear;
use peft_prelude::peft::{get_peft_model, LoraConfig, LoraInit, PeftModel};
use peft_prelude::quant::nf4::{double_quantize, quantize_blocks};
use peft_prelude::quant::{bnb, Absmax, Nf4Weight, Quantization, QuantizedWeight};
use peft_prelude::train::causal_lm_loss;
use peft_prelude::train::sft::{batch_gradients, batch_loss};
use peft_tests::{assert_logits_match, fixture, tensors};

const TOL: f32 = 1e-4;

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn quantizer_is_bit_exact_with_bitsandbytes() {
    let t = tensors("nf4/nf4.safetensors");
    let input = t["input"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (packed, absmax) = quantize_blocks(&input, 64);
    // Plain: packed bytes, f32 absmax (including the all-zero block), dequantized values.
    assert_eq!(packed, u8s(&t["plain.weight"]), "plain packed codes");
    assert_eq!(
        f32_bits(&absmax),
        bits(&t["plain.weight.absmax"]),
        "plain absmax"
    );
    let plain = Nf4Weight::quantize(&t["input"], false).unwrap();
    assert_eq!(
        bits(&plain.dequantize().unwrap()),
        bits(&t["plain.dequantized"]),
        "plain dequantized"
    );

    // Nested: u8 absmax codes, nested absmax, code map, offset, the absmax actually used.
    let Absmax::Nested {
        codes,
        code_map,
        nested_absmax,
        nested_blocksize,
        offset,
    } = double_quantize(&absmax, 256)
    else {
        panic!("double quantization gives nested statistics")
    };
    assert_eq!(nested_blocksize, 256);
    assert_eq!(
        codes,
        u8s(&t["nested.weight.absmax"]),
        "nested absmax codes"
    );
    assert_eq!(
        f32_bits(&nested_absmax),
        bits(&t["nested.weight.nested_absmax"]),
        "nested absmax"
    );
    assert_eq!(
        f32_bits(&code_map),
        bits(&t["nested.weight.nested_quant_map"]),
        "nested quant map"
    );
    assert_eq!(
        offset.to_bits(),
        t["nested.offset"].to_scalar::<f32>().unwrap().to_bits(),
        "offset"
    );
    let nested = Nf4Weight::quantize(&t["input"], true).unwrap();
    assert_eq!(
        u8s(nested.matrix().packed()),
        u8s(&t["nested.weight"]),
        "nested packed codes"
    );
    assert_eq!(
        f32_bits(&nested.matrix().absmax().decode()),
        bits(&t["nested.absmax_dequantized"]),
        "absmax used"
    );
    assert_eq!(
        bits(&nested.dequantize().unwrap()),
        bits(&t["nested.dequantized"]),
        "nested dequantized"
    );
    assert_eq!(
        f32_bits(nested.matrix().code()),
        bits(&t["plain.weight.quant_map"]),
        "NF4 code book"
    );
}

#[test]
fn serialized_bnb_tensors_dequantize_bit_exactly() {
    let source = SafetensorsSource::open(vec![fixture("nf4/nf4.safetensors")]).unwrap();
    let t = tensors("nf4/nf4.safetensors");
    for (name, double) in [("plain", false), ("nested", true)] {
        let w = bnb::load_nf4(&source, &format!("{name}.weight"), &[128, 256], DType::F32).unwrap();
        assert_eq!(w.is_double_quant(), double);
        assert_eq!(
            bits(&w.dequantize().unwrap()),
            bits(&t[&format!("{name}.dequantized")]),
            "{name}"
        );
    }
}

fn reference() -> HashMap<String, Tensor> {
    tensors("nf4/tiny-mistral-bnb-4bit-reference.safetensors")
}

fn input_ids() -> Tensor {
    reference()["input_ids"].to_dtype(DType::U32).unwrap()
}

fn bnb_model() -> Model {
    load_model_from_dir(
        fixture("nf4/tiny-mistral-bnb-4bit"),
        &LoadOptions::default(),
    )
    .unwrap()
}

/// The same model with every quantized projection replaced by its dequantized dense weight.
fn dequantized_copy(model: &Model) -> Model {
    let mut dense = bnb_model();
    for path in model.linear_paths() {
        let w = model.linear(&path).unwrap().base().dense_weight().unwrap();
        dense
            .replace_linear(&path, |_| Ok(Box::new(FrozenLinear::new(w, None))))
            .unwrap();
    }
    dense
}

#[test]
fn bnb_checkpoint_gives_the_reference_logits() {
    let model = bnb_model();
    let quantized = model
        .linear_paths()
        .iter()
        .filter(|p| model.linear(p).unwrap().base().is_quantized())
        .count();
    assert_eq!(
        quantized, 14,
        "the 14 decoder projections stay 4-bit; lm_head is dense"
    );
    let logits = model.forward(&input_ids()).unwrap();
    let worst = assert_logits_match(&logits, &reference(), "bnb_forward", None, TOL);
    println!("bnb-4bit forward vs bitsandbytes: max diff {worst:e}");
    let dense = dequantized_copy(&model).forward(&input_ids()).unwrap();
    let worst = assert_logits_match(&dense, &reference(), "dequantized_dense", None, TOL);
    println!("dequantized dense vs reference: max diff {worst:e}");
}

/// Decoding with the KV cache, one token at a time, runs the NF4 projections through the row
/// kernel on the packed codes (and, for the down projection's 160-column rows, which are not
/// whole blocks, the dequantizing row path); every step's logits must match the full forward of
/// the same model with its projections dequantized to dense weights.
#[test]
fn cached_decoding_matches_the_dequantized_model() {
    let model = bnb_model();
    let ids = input_ids().narrow(0, 0, 1).unwrap();
    let t = ids.dim(1).unwrap();
    let dense = dequantized_copy(&model).forward(&ids).unwrap();
    let mut cache = model.new_cache();
    for i in 0..t {
        let step = ids.narrow(1, i, 1).unwrap();
        let logits = model
            .forward_last(Forward::ids(&step).with_cache(&mut cache))
            .unwrap();
        let want = dense.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
        let diff = max_abs_diff(&logits, &want);
        assert!(
            diff <= TOL * (1.0 + max_abs(&want)),
            "step {i}: cached NF4 decoding differs from the dequantized model by {diff}"
        );
    }
}

#[test]
fn load_in_4bit_reproduces_the_bnb_checkpoint_byte_for_byte() {
    let ours = load_model_from_dir(fixture("tiny-mistral"), &LoadOptions::load_in_4bit()).unwrap();
    let source =
        SafetensorsSource::open(vec![fixture("nf4/tiny-mistral-bnb-4bit/model.safetensors")])
            .unwrap();
    for path in ours.linear_paths().iter().filter(|p| *p != "lm_head") {
        let q = ours
            .linear(path)
            .unwrap()
            .base()
            .quantized_weight()
            .cloned()
            .expect("quantized");
        let nf4 = q
            .as_any()
            .downcast_ref::<Nf4Weight>()
            .expect("an NF4 layer");
        let name = format!("{path}.weight");
        let packed = source.load(&name, DType::U8, &Device::Cpu).unwrap();
        assert_eq!(u8s(nf4.matrix().packed()), u8s(&packed), "{name}");
        let Absmax::Nested {
            codes,
            nested_absmax,
            offset,
            ..
        } = nf4.matrix().absmax()
        else {
            panic!("double quantized")
        };
        assert_eq!(
            *codes,
            u8s(&source
                .load(&format!("{name}.absmax"), DType::U8, &Device::Cpu)
                .unwrap())
        );
        let na = source
            .load(&format!("{name}.nested_absmax"), DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(f32_bits(nested_absmax), bits(&na), "{name}.nested_absmax");
        let state = source
            .load(
                &format!("{name}.quant_state.bitsandbytes__nf4"),
                DType::U8,
                &Device::Cpu,
            )
            .unwrap();
        let state: serde_json::Value = serde_json::from_slice(&u8s(&state)).unwrap();
        assert_eq!(
            *offset,
            state["nested_offset"].as_f64().unwrap() as f32,
            "{name} offset"
        );
    }
    let logits = ours.forward(&input_ids()).unwrap();
    assert_logits_match(&logits, &reference(), "bnb_forward", None, TOL);
    // Plain NF4 (no double quantization) also loads and runs.
    let plain = load_model_from_dir(
        fixture("tiny-mistral"),
        &LoadOptions::default().with_quantization(Quantization::Nf4 {
            double_quant: false,
        }),
    )
    .unwrap();
    let l = plain
        .linear("model.layers.0.mlp.down_proj")
        .unwrap()
        .base()
        .quantized_weight()
        .cloned()
        .unwrap();
    assert_eq!(l.format(), "nf4");
    assert!(plain.forward(&input_ids()).is_ok());
}

fn lora_on(model: Model) -> peft_prelude::peft::PeftModel {
    let mut config = LoraConfig::all_projections(4, 8.0);
    config.init_lora_weights = LoraInit::Bool(false); // random A and B: a non-trivial adapter
    get_peft_model(model, config).unwrap()
}

/// LoRA over `quantized` against LoRA over `dense`: the forward and every adapter gradient,
/// as `(forward max diff, gradient max diff, largest gradient)`. Also checks that nothing but
/// the adapters got a gradient.
fn lora_difference(quantized: Model, dense: Model) -> (f32, f32, f32) {
    let quantized = lora_on(quantized);
    let dense = lora_on(dense);
    // Training mode, as the trainers run (a quantized base takes the integer products there).
    quantized.train();
    dense.train();
    let ids = input_ids();
    let labels = ids.to_dtype(DType::I64).unwrap();
    let (lq, ld) = (
        quantized.forward(&ids).unwrap(),
        dense.forward(&ids).unwrap(),
    );
    let fwd = max_abs_diff(&lq, &ld);
    let (loss_q, _) = causal_lm_loss(&lq, &labels).unwrap();
    let (loss_d, _) = causal_lm_loss(&ld, &labels).unwrap();
    let (gq, gd) = (loss_q.backward().unwrap(), loss_d.backward().unwrap());
    let (vq, vd) = (quantized.trainable_vars(), dense.trainable_vars());
    assert_eq!(vq.len(), 28);
    let (mut worst, mut largest) = (0f32, 0f32);
    for ((nq, q), (nd, d)) in vq.iter().zip(&vd) {
        assert_eq!(nq, nd);
        let a = gq
            .get(q.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {nq}"));
        let b = gd.get(d.as_tensor()).unwrap();
        worst = worst.max(max_abs_diff(a, b));
        largest = largest.max(max_abs(b));
    }
    // Nothing but the adapters got a gradient: no tensor with a base weight's shape.
    let m = quantized.model();
    for p in m.linear_paths() {
        let base = m.linear(&p).unwrap().base();
        assert!(gq.get(base.weight()).is_none(), "{p}");
    }
    (fwd, worst, largest)
}

/// The reference input as one training batch, every next token counted.
fn whole_batch() -> Batch {
    let ids = input_ids();
    let (b, t) = ids.dims2().unwrap();
    Batch {
        labels: ids.to_dtype(DType::I64).unwrap(),
        input_ids: ids,
        attention_mask: None,
        position_ids: None,
        segment_ids: None,
        num_tokens: b * t,
        num_label_tokens: b * (t - 1),
    }
}

/// The trainers' fused head loss (`batch_gradients`, the path every SFT step takes) over
/// `quantized` against `dense`: `(loss difference, largest adapter-gradient difference, the
/// dense model's loss)`.
fn fused_loss_difference(quantized: &PeftModel, dense: &PeftModel) -> (f32, f32, f32) {
    let batch = whole_batch();
    let run = |m: &PeftModel| {
        m.train();
        let vars: Vec<_> = m.trainable_vars().into_iter().map(|(_, v)| v).collect();
        batch_gradients(m, &batch, 1.0, &vars, false).unwrap()
    };
    let ((lq, _, gq), (ld, _, gd)) = (run(quantized), run(dense));
    let worst = gq
        .iter()
        .zip(&gd)
        .map(|(a, b)| max_abs_diff(a.as_ref().unwrap(), b.as_ref().unwrap()))
        .fold(0f32, f32::max);
    ((lq - ld).abs() as f32, worst, ld as f32)
}

/// Both ways a 4-bit base trains. With the integer products off: equal to LoRA over the same
/// weights dense, to f32 rounding. On the integer GEMM (8-bit blocks, where the CPU has
/// AVX512-VNNI): off from it by a small fraction of what the 4-bit base itself moves the
/// model (the original f32 tiny-mistral against its NF4 copy). One test, because the switch
/// is process-wide.
#[test]
fn qlora_forward_and_gradients_match_the_dense_model() {
    let dense = || dequantized_copy(&bnb_model());
    let original =
        || load_model_from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    peft_prelude::quant::set_integer_products(false);
    let exact = lora_difference(bnb_model(), dense());
    let nf4 = lora_difference(dense(), original());
    peft_prelude::quant::set_integer_products(true);
    let int8 = lora_difference(bnb_model(), dense());
    println!(
        "QLoRA vs dense LoRA (forward, gradients, largest gradient): exact {exact:?}, \
              integer products ({}) {int8:?}; the 4-bit base vs the original: {nf4:?}",
        peft_prelude::quant::integer_products()
    );
    assert!(exact.0 < TOL && exact.1 < TOL, "{exact:?}");
    if peft_prelude::quant::integer_products() {
        assert!(int8.0 > 0.0, "the integer products were used");
    }
    assert!(int8.0 < 0.25 * nf4.0, "forward: {int8:?} against {nf4:?}");
    assert!(int8.1 < 0.25 * nf4.1, "gradients: {int8:?} against {nf4:?}");

    // The same through the trainers' fused loss, where the head (dense f32 over a 4-bit base,
    // as in QLoRA) takes the integer products too when the base does.
    let (quantized, dense_peft) = (lora_on(bnb_model()), lora_on(dense()));
    peft_prelude::quant::set_integer_products(false);
    let fused_exact = fused_loss_difference(&quantized, &dense_peft);
    assert!(!quantized.model().holds_integer_head());
    let fused_nf4 = fused_loss_difference(&lora_on(dense()), &lora_on(original()));
    peft_prelude::quant::set_integer_products(true);
    let fused_int8 = fused_loss_difference(&quantized, &dense_peft);
    println!(
        "fused loss (loss, gradients): exact {fused_exact:?}, integer products {fused_int8:?}; \
         the 4-bit base vs the original: {fused_nf4:?}"
    );
    assert!(
        fused_exact.0 < TOL && fused_exact.1 < TOL,
        "{fused_exact:?}"
    );
    // The gradients as above. The 4-bit base's errors largely cancel in the mean loss (it moves
    // it by 0.014 of 10.4), the 8-bit blocks' too: the loss is held to 0.1% of its value.
    assert!(
        fused_int8.1 < 0.25 * fused_nf4.1,
        "{fused_int8:?} against {fused_nf4:?}"
    );
    assert!(fused_int8.0 < 1e-3 * fused_int8.2, "{fused_int8:?}");
    // Kept for the next batch where the CPU has the kernel, never for a dense base.
    assert_eq!(
        quantized.model().holds_integer_head(),
        peft_prelude::quant::integer_products()
    );
    assert!(!dense_peft.model().holds_integer_head());
    // An evaluation (the layers' f32 products) leaves them for the next training batch.
    quantized.eval();
    batch_loss(&quantized, &whole_batch()).unwrap();
    assert_eq!(
        quantized.model().holds_integer_head(),
        peft_prelude::quant::integer_products()
    );
    quantized.release_training_buffers();
    assert!(!quantized.model().holds_integer_head());
    // ... and builds none.
    batch_loss(&quantized, &whole_batch()).unwrap();
    assert!(!quantized.model().holds_integer_head());
    // A training batch builds the integer products (where the CPU has the kernel); releasing
    // the training buffers drops every one of them.
    let peft = lora_on(bnb_model());
    peft.train();
    peft.forward(&input_ids()).unwrap();
    let m = peft.model();
    let lora_layers: Vec<&LoraLinear> = m
        .linear_paths()
        .iter()
        .filter_map(|p| m.linear(p).unwrap().as_any().downcast_ref::<LoraLinear>())
        .collect();
    let holding = || {
        lora_layers
            .iter()
            .filter(|l| l.holds_integer_products())
            .count()
    };
    // The projections whose both dimensions are whole 64-value blocks (q and o here).
    let eligible = lora_layers
        .iter()
        .filter(|l| {
            let (out, inp) = peft_prelude::model::Linear::base(**l).shape();
            out.is_multiple_of(64) && inp.is_multiple_of(64)
        })
        .count();
    assert_eq!(eligible, 4);
    let expected = if peft_prelude::quant::integer_products() {
        eligible
    } else {
        0
    };
    assert_eq!(holding(), expected);
    peft.release_training_buffers();
    assert_eq!(holding(), 0);
}

#[test]
fn merging_into_the_4bit_base_requantizes() {
    let path = "model.layers.1.self_attn.q_proj";
    let peft = lora_on(bnb_model());
    let layer = peft.model().linear(path).unwrap();
    let lora = layer
        .as_any()
        .downcast_ref::<LoraLinear>()
        .expect("a LoRA layer");
    let delta = lora.adapters()["default"].delta_weight(DType::F32).unwrap();
    let expected = (layer.base().dense_weight().unwrap() + delta).unwrap();
    let expected = Nf4Weight::quantize(&expected, true)
        .unwrap()
        .dequantize()
        .unwrap();
    let merged = peft.merge_and_unload().unwrap();
    let q = merged.linear(path).unwrap().base();
    assert!(q.is_quantized(), "the merged base stays 4-bit");
    assert_eq!(q.quantized_weight().unwrap().format(), "nf4 (double quant)");
    // dequantize, add, re-quantize: exactly what bitsandbytes' merge does.
    assert_eq!(bits(&q.dense_weight().unwrap()), bits(&expected));
    assert!(merged.forward(&input_ids()).is_ok());
}

/// A copy of the bnb checkpoint with `edit` applied to its tensors.
fn corrupted_checkpoint(tag: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let src = fixture("nf4/tiny-mistral-bnb-4bit");
    let dir = std::env::temp_dir().join(format!("peft-quant-nf4-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let err = load_model_from_dir(dir, &LoadOptions::default()).expect_err("loading must fail");
    err.to_string()
}

#[test]
fn bad_bnb_checkpoints_name_the_tensor() {
    let state = "model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4";
    let dir = corrupted_checkpoint("no-state", |t| {
        t.remove(state);
    });
    let msg = load_error(&dir);
    assert!(msg.contains(state) && msg.contains("missing"), "{msg}");

    let packed = "model.layers.1.mlp.up_proj.weight";
    let dir = corrupted_checkpoint("short", |t| {
        let w = t[packed].narrow(0, 0, 100).unwrap();
        t.insert(packed.into(), w);
    });
    let msg = load_error(&dir);
    assert!(msg.contains(packed) && msg.contains("[5120, 1]"), "{msg}");

    let dir = corrupted_checkpoint("float-absmax", |t| {
        let name = "model.layers.0.mlp.gate_proj.weight.absmax";
        let a = t[name].to_dtype(DType::F32).unwrap();
        t.insert(name.into(), a);
    });
    let msg = load_error(&dir);
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight.absmax") && msg.contains("U8"),
        "{msg}"
    );

    let dir = corrupted_checkpoint("bad-json", |t| {
        let bytes = Tensor::new(b"{not json".as_slice(), &Device::Cpu).unwrap();
        t.insert(state.into(), bytes);
    });
    let msg = load_error(&dir);
    assert!(msg.contains(state), "{msg}");

    // An 8-bit or fp4 quantization_config is refused with the file named.
    let dir = corrupted_checkpoint("fp4", |_| {});
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"nf4\"", "\"fp4\""),
    )
    .unwrap();
    let msg = load_error(&dir);
    assert!(msg.contains("config.json") && msg.contains("fp4"), "{msg}");
}
