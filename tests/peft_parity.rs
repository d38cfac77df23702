//! Adapters made by Python PEFT on the tiny Mistral, loaded here: logits (active and merged),
//! the LoRA gradient fixture, save/load round trips in PEFT's exact format.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use peft_prelude::model::{LoadOptions, Model, Pretrained};
use peft_prelude::peft::io::read_safetensors;
use peft_prelude::peft::PeftModel;
use peft_prelude::train::causal_lm_loss;
use peft_tests::{assert_logits_match, fixture, tensors};

const TOL: f32 = 1e-4;

fn base() -> Model {
    Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default())
        .unwrap()
        .model
}

fn input_ids() -> Tensor {
    tensors("adapters/reference.safetensors")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
}

fn check_active(name: &str) -> PeftModel {
    let peft = PeftModel::from_pretrained(base(), fixture(&format!("adapters/{name}"))).unwrap();
    let logits = peft.forward(&input_ids()).unwrap();
    let r = tensors("adapters/reference.safetensors");
    let worst = assert_logits_match(&logits, &r, &format!("{name}.active"), None, TOL);
    eprintln!("{name}: active max |diff| {worst:e}");
    peft
}

fn check_merged(peft: PeftModel, name: &str) {
    let merged = peft.merge_and_unload().unwrap();
    let logits = merged.forward(&input_ids()).unwrap();
    let r = tensors("adapters/reference.safetensors");
    assert_logits_match(&logits, &r, &format!("{name}.merged"), None, TOL);
}

#[test]
fn lora_active_and_merged() {
    let peft = check_active("lora");
    assert_eq!(peft.trainable_vars().len(), 28);
    check_merged(peft, "lora");
}

#[test]
fn rslora_dora_active_and_merged() {
    let peft = check_active("lora-rslora-dora");
    assert_eq!(
        peft.trainable_vars().len(),
        12,
        "A, B and magnitude for q and v in 2 layers"
    );
    check_merged(peft, "lora-rslora-dora");
}

#[test]
fn ia3_active_and_merged() {
    let peft = check_active("ia3");
    check_merged(peft, "ia3");
}

#[test]
fn prompt_tuning_active() {
    let peft = check_active("prompt-tuning");
    assert_eq!(
        peft.forward(&input_ids()).unwrap().dim(1).unwrap(),
        32,
        "virtual positions included"
    );
}

#[test]
fn prefix_tuning_active() {
    let peft = check_active("prefix-tuning");
    assert_eq!(peft.forward(&input_ids()).unwrap().dim(1).unwrap(), 24);
}

#[test]
fn p_tuning_active_and_our_encoder_reproduces_pefts() {
    check_active("p-tuning");
    // PEFT saves only the encoder's output; its encoder weights are in a separate fixture.
    // Our MLP encoder with those weights must produce exactly that output.
    let mut config = peft_prelude::peft::PromptEncoderConfig::default();
    config.prompt.num_virtual_tokens = 8;
    config.encoder_hidden_size = Some(32);
    let peft = peft_prelude::peft::get_peft_model(base(), config).unwrap();
    let enc = tensors("adapters/p-tuning-encoder.safetensors");
    let values: BTreeMap<String, Tensor> = enc
        .into_iter()
        .filter(|(k, _)| k != "encoder_output")
        .collect();
    assert_eq!(peft.set_adapter_vars("default", &values).unwrap(), 7);
    let state = peft.adapter_state_dict("default").unwrap();
    assert_eq!(state.len(), 1);
    assert_eq!(state[0].0, "prompt_embeddings");
    let expected = &tensors("adapters/p-tuning-encoder.safetensors")["encoder_output"];
    let diff = (&state[0].1 - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
}

#[test]
fn lora_gradients_match_torch() {
    let peft = PeftModel::from_pretrained(base(), fixture("adapters/lora")).unwrap();
    let g = tensors("adapters/lora-grad.safetensors");
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let labels = &g["labels"];
    let logits = peft.forward(&ids).unwrap();
    let (loss, count) = causal_lm_loss(&logits, labels).unwrap();
    assert_eq!(count, 18);
    let loss_value = loss.to_scalar::<f32>().unwrap();
    assert!((loss_value - 10.341_454).abs() < 1e-5, "loss {loss_value}");
    let grads = loss.backward().unwrap();
    let vars = peft.trainable_vars();
    assert_eq!(vars.len(), 28);
    let mut worst = 0f32;
    for (name, var) in &vars {
        let ours = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let theirs = g
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no {name}"));
        let d = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    assert!(worst < 1e-4, "gradients differ by {worst}");
    // No frozen weight got a gradient: no projection, norm, embedding or head.
    let m = peft.model();
    let mut frozen: Vec<&Tensor> = vec![m.embed_tokens(), m.final_norm().weight()];
    let paths = m.linear_paths();
    for p in &paths {
        frozen.push(m.linear(p).unwrap().base().weight());
    }
    for layer in m.layers() {
        frozen.push(layer.input_layernorm.weight());
        frozen.push(layer.post_attention_layernorm.weight());
    }
    assert_eq!(frozen.len(), 2 + 15 + 4);
    for t in &frozen {
        assert!(
            grads.get(t).is_none(),
            "a frozen weight of shape {:?} has a gradient",
            t.dims()
        );
    }
    // candle stores a gradient under whatever view of a weight took part in an op (`w.t()`),
    // so also check that no gradient at all has the shape of a frozen weight or its transpose.
    let var_ids: Vec<_> = vars.iter().map(|(_, v)| v.as_tensor().id()).collect();
    let weight_shapes: Vec<Vec<usize>> = frozen
        .iter()
        .flat_map(|t| {
            let d = t.dims().to_vec();
            let mut r = d.clone();
            r.reverse();
            [d, r]
        })
        .collect();
    let mut extra = 0;
    for id in grads.get_ids().filter(|id| !var_ids.contains(id)) {
        let shape = grads.get_id(*id).unwrap().dims().to_vec();
        assert!(
            !weight_shapes.contains(&shape),
            "a gradient of weight shape {shape:?} was computed"
        );
        extra += 1;
    }
    // What remains are the first layer's input activations (not trainable, tiny).
    eprintln!("{extra} activation-sized gradients at the graph boundary");
    eprintln!("lora grads: max |diff| {worst:e}");
}

#[test]
fn saved_adapters_round_trip_with_pefts_names_shapes_and_dtypes() {
    for name in [
        "lora",
        "lora-rslora-dora",
        "ia3",
        "prompt-tuning",
        "prefix-tuning",
        "p-tuning",
    ] {
        let src = fixture(&format!("adapters/{name}"));
        let peft = PeftModel::from_pretrained(base(), &src).unwrap();
        let dir =
            std::env::temp_dir().join(format!("peft-roundtrip-{name}-{}", std::process::id()));
        peft.save_pretrained(&dir).unwrap();

        // Same tensor names, shapes and dtypes as the file Python PEFT wrote.
        let theirs = read_safetensors(src.join("adapter_model.safetensors")).unwrap();
        let ours = read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
        let layout = |m: &BTreeMap<String, Tensor>| -> Vec<(String, Vec<usize>, DType)> {
            m.iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
                .collect()
        };
        assert_eq!(layout(&ours), layout(&theirs), "{name}");

        // The config says the same thing (its keys are sorted and PEFT's type is kept).
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let their_cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], their_cfg["peft_type"], "{name}");
        for key in [
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "num_virtual_tokens",
            "token_dim",
            "prefix_projection",
        ] {
            if their_cfg.get(key).is_some() {
                assert_eq!(cfg[key], their_cfg[key], "{name}: {key}");
            }
        }

        // Reloading ours gives identical logits.
        let again = PeftModel::from_pretrained(base(), &dir).unwrap();
        let a = peft.forward(&input_ids()).unwrap();
        let b = again.forward(&input_ids()).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
        assert!(
            std::fs::read_dir(&dir).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp")),
            "no temporary files left behind"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn disabling_adapters_gives_the_base_model() {
    let plain = base().forward(&input_ids()).unwrap();
    for name in ["lora", "ia3", "prefix-tuning"] {
        let peft =
            PeftModel::from_pretrained(base(), fixture(&format!("adapters/{name}"))).unwrap();
        let with = peft.forward(&input_ids()).unwrap();
        let without = peft.with_adapters_disabled(|m| m.forward(&input_ids()).unwrap());
        let d_base = (&without - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d_adapter = (&with - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d_base, 0.0, "{name}: disabled = base");
        assert!(d_adapter > 0.1, "{name}: the adapter matters ({d_adapter})");
        assert!(peft.adapters_enabled(), "state restored");
    }
}
