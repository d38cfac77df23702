//! Finite-difference checks of every PEFT method's trainable parameters on a small random
//! model, and the bad-input errors of `get_peft_model` / `from_pretrained`.

use candle_core::{DType, Device, Tensor};
use peft_prelude::model::decoder::ModelWeights;
use peft_prelude::model::{Architecture, Model, ModelConfig};
use peft_prelude::peft::{
    get_peft_model, BottleneckConfig, Ia3Config, LoraConfig, LoraInit, PeftConfig, PeftModel,
    PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TargetModules,
};
use peft_prelude::Error;

fn small_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Mistral,
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        max_position_embeddings: 64,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        sliding_window: Some(4),
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: vec![2],
        variant: Default::default(),
        hf_config: None,
    }
}

fn small_model() -> Model {
    model_in(DType::F32)
}

fn model_in(dtype: DType) -> Model {
    let c = small_config();
    let w = ModelWeights::random(&c, 0.3, dtype, &Device::Cpu).unwrap();
    Model::new(c, w).unwrap()
}

fn ids() -> Tensor {
    Tensor::new(
        &[[3u32, 9, 1, 22, 7, 30], [5, 5, 18, 2, 39, 11]],
        &Device::Cpu,
    )
    .unwrap()
}

/// `sum(logits ⊙ c)`: every logit matters, so every parameter's gradient is exercised.
fn objective(peft: &PeftModel, c: &Tensor) -> Tensor {
    let logits = peft.forward(&ids()).unwrap();
    (logits * c).unwrap().sum_all().unwrap()
}

/// Directional derivative along a random direction, autograd vs central differences, for
/// every trainable tensor of the active adapter (in f64, so the comparison is tight).
fn check_method(label: &str, config: impl Into<PeftConfig>) {
    check_method_except(label, config, &[]);
}

/// `skip`: name suffixes whose autograd gradient is deliberately not the true derivative.
fn check_method_except(label: &str, config: impl Into<PeftConfig>, skip: &[&str]) {
    let peft = get_peft_model(model_in(DType::F64), config).unwrap();
    let out_shape = peft.forward(&ids()).unwrap().dims().to_vec();
    // Seeded, so a run is reproducible (finite differences near a ReLU kink would otherwise
    // make the outcome depend on the draw).
    let c = seeded_normal(&out_shape, 1);
    let loss = objective(&peft, &c);
    let grads = loss.backward().unwrap();
    let vars = peft.trainable_vars();
    assert!(!vars.is_empty(), "{label}: no trainable parameters");
    let mut checked = 0;
    for (name, var) in &vars {
        assert_eq!(var.dtype(), DType::F64, "{label}: {name}");
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
        if skip.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let v = seeded_normal(var.dims(), 2 + checked as u64);
        let analytic = (g * &v)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        let eps = 1e-5;
        let at = |s: f64| -> f64 {
            var.set(&(&original + (&v * s).unwrap()).unwrap()).unwrap();
            objective(&peft, &c).to_scalar::<f64>().unwrap()
        };
        // Central differences at eps and eps/2, Richardson-extrapolated: the truncation
        // error falls from O(eps²) (up to ~3e-6 relative on these random weights, which
        // failed the 1e-5 bound now and then) to O(eps⁴).
        let central = |h: f64| (at(h) - at(-h)) / (2.0 * h);
        let numeric = (4.0 * central(eps / 2.0) - central(eps)) / 3.0;
        var.set(&original).unwrap();
        let err = (numeric - analytic).abs();
        assert!(
            err <= 1e-5 * analytic.abs().max(1.0),
            "{label}: {name}: autograd {analytic} vs finite differences {numeric}"
        );
        checked += 1;
        assert!(
            analytic.abs() > 1e-6,
            "{label}: {name}: the gradient is zero, the check proves nothing"
        );
    }
    assert!(checked > 0, "{label}: nothing checked");
    eprintln!(
        "{label}: {checked} of {} parameter tensors checked",
        vars.len()
    );
}

fn seeded_normal(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    let values: Vec<f64> = peft_prelude::rng::Rng::new(seed)
        .normal(n, 0.0, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn random_lora() -> LoraConfig {
    LoraConfig {
        r: 3,
        lora_alpha: 6.0,
        init_lora_weights: LoraInit::Bool(false),
        target_modules: Some(TargetModules::all_linear()),
        ..Default::default()
    }
}

#[test]
fn lora_gradients() {
    check_method("lora", random_lora());
}

#[test]
fn rslora_dora_gradients() {
    check_method(
        "rslora",
        LoraConfig {
            use_rslora: true,
            ..random_lora()
        },
    );
    // DoRA treats the weight norm as a constant in backward (PEFT and the DoRA paper do: it
    // saves the norm's gradient graph), so A and B do not get the exact derivative of the
    // forward; the magnitude does.
    check_method_except(
        "dora",
        LoraConfig {
            use_dora: true,
            ..random_lora()
        },
        &["lora_A.weight", "lora_B.weight"],
    );
}

#[test]
fn ia3_gradients() {
    check_method("ia3", Ia3Config::default());
}

#[test]
fn prompt_tuning_gradients() {
    let mut c = PromptTuningConfig::default();
    c.prompt.num_virtual_tokens = 3;
    check_method("prompt tuning", c);
}

#[test]
fn p_tuning_mlp_and_lstm_gradients() {
    let mut c = PromptEncoderConfig::default();
    c.prompt.num_virtual_tokens = 3;
    c.encoder_hidden_size = Some(8);
    check_method("p-tuning mlp", c.clone());
    c.encoder_reparameterization_type = "LSTM".into();
    check_method("p-tuning lstm", c);
}

#[test]
fn prefix_tuning_gradients() {
    let mut c = PrefixTuningConfig::default();
    c.prompt.num_virtual_tokens = 3;
    check_method("prefix", c.clone());
    c.prefix_projection = true;
    c.encoder_hidden_size = Some(8);
    check_method("prefix with projection", c);
}

#[test]
fn bottleneck_gradients() {
    // Finite differences cannot be trusted across ReLU's kink (a step of 1e-5 that crosses it
    // changes the slope), so the checks use the smooth swish; ReLU's own derivative is candle's.
    let smooth = |c: BottleneckConfig| BottleneckConfig {
        reduction_factor: 4,
        non_linearity: "swish".into(),
        ..c
    };
    check_method("houlsby", smooth(BottleneckConfig::houlsby()));
    check_method("pfeiffer", smooth(BottleneckConfig::pfeiffer()));
    check_method(
        "parallel",
        smooth(BottleneckConfig {
            init_weights: "bert".into(),
            ..BottleneckConfig::parallel()
        }),
    );
}

#[test]
fn default_lora_starts_as_a_no_op_and_counts_parameters_like_peft() {
    let model = small_model();
    let before = model.forward(&ids()).unwrap();
    let peft = get_peft_model(model, LoraConfig::all_projections(4, 8.0)).unwrap();
    let after = peft.forward(&ids()).unwrap();
    assert_eq!(
        (before - after)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // per layer: q 4·(16+16), k 4·(16+8), v 4·(16+8), o 4·(16+16), gate/up 4·(16+24) each, down 4·(24+16)
    let per_layer = 4 * (32 + 24 + 24 + 32 + 40 + 40 + 40);
    assert_eq!(peft.num_trainable_parameters(), 2 * per_layer);
    let base = 40 * 16 * 2 + 5 * 16 + 2 * (16 * 16 * 2 + 8 * 16 * 2 + 24 * 16 * 3);
    let line = peft.trainable_parameters_line();
    let expected = format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        format_thousands(2 * per_layer),
        format_thousands(base + 2 * per_layer),
        100.0 * (2 * per_layer) as f64 / (base + 2 * per_layer) as f64
    );
    assert_eq!(line, expected);
}

fn format_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn several_adapters_switch_and_merge_unmerge() {
    let mut peft = PeftModel::new(small_model()).with_seed(1);
    peft.add_adapter("a", random_lora()).unwrap();
    peft.add_adapter(
        "b",
        LoraConfig {
            r: 2,
            ..random_lora()
        },
    )
    .unwrap();
    let out_a = peft.forward(&ids()).unwrap();
    peft.set_adapter("b").unwrap();
    let out_b = peft.forward(&ids()).unwrap();
    let d = (&out_a - &out_b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 1e-3, "different adapters give different outputs");
    assert_eq!(peft.trainable_vars().len(), 2 * 7 * 2);
    peft.merge_adapter().unwrap();
    let merged = peft.forward(&ids()).unwrap();
    let d = (&merged - &out_b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "merged = active ({d})");
    peft.unmerge_adapter().unwrap();
    let back = peft.forward(&ids()).unwrap();
    let d = (&back - &out_b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "unmerged = active ({d})");
    assert!(peft.set_adapter("c").is_err());
}

#[test]
fn bad_configs_give_clear_errors() {
    let err = get_peft_model(
        small_model(),
        LoraConfig {
            r: 0,
            ..LoraConfig::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("r must be positive"), "{err}");

    let cfg = LoraConfig {
        target_modules: Some(TargetModules::names(&["q_prj"])),
        ..Default::default()
    };
    let err = get_peft_model(small_model(), cfg).unwrap_err();
    assert!(matches!(err, Error::UnknownModule { .. }), "{err:?}");
    assert!(
        err.to_string().contains("q_proj"),
        "lists close matches: {err}"
    );

    let cfg = LoraConfig {
        target_modules: Some(TargetModules::names(&["model.layers.7.self_attn.q_proj"])),
        ..Default::default()
    };
    let err = get_peft_model(small_model(), cfg).unwrap_err();
    assert!(
        err.to_string().contains("model.layers.1.self_attn.q_proj"),
        "{err}"
    );

    let err = get_peft_model(
        small_model(),
        BottleneckConfig {
            reduction_factor: 0,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("reduction_factor"), "{err}");
}

#[test]
fn adapters_that_do_not_fit_the_model_or_have_unknown_types() {
    // The tiny-Mistral LoRA fixture has [4, 64] matrices; this model's hidden size is 16.
    let dir = peft_tests::fixture("adapters/lora");
    let err = PeftModel::from_pretrained(small_model(), &dir).unwrap_err();
    match &err {
        Error::ShapeMismatch {
            name,
            expected,
            got,
            ..
        } => {
            assert!(name.ends_with("lora_A.weight"), "{name}");
            assert_eq!(
                name,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
            );
            assert_eq!(
                (expected.as_slice(), got.as_slice()),
                (&[4usize, 16][..], &[4usize, 64][..])
            );
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert!(
        err.to_string().contains("adapter_model.safetensors"),
        "{err}"
    );

    let tmp = std::env::temp_dir().join(format!("peft-unknown-type-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(
        tmp.join("adapter_config.json"),
        r#"{"peft_type": "LOHA", "r": 4}"#,
    )
    .unwrap();
    let err = PeftModel::from_pretrained(small_model(), &tmp).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("LOHA") && msg.contains("adapter_config.json") && msg.contains("LORA"),
        "{msg}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn modules_to_save_train_copies_of_the_head_and_embeddings() {
    let lora = LoraConfig {
        modules_to_save: Some(vec!["lm_head".into(), "embed_tokens".into()]),
        ..random_lora()
    };
    // Gradients of the copies (and of A, B) are exact.
    check_method("lora + modules_to_save", lora.clone());

    let base = small_model();
    let plain = base.forward(&ids()).unwrap();
    let peft = get_peft_model(
        base,
        LoraConfig {
            init_lora_weights: LoraInit::Bool(true),
            ..lora
        },
    )
    .unwrap();
    let names: Vec<String> = peft.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"base_model.model.lm_head.weight".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"base_model.model.model.embed_tokens.weight".to_string()));
    // Untrained copies change nothing; training them changes the model only while active.
    let d = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // (Up to rounding: the trainable copy multiplies with the GEMM, the frozen head with the
    // row kernel used for a few rows.)
    assert!(d(&peft.forward(&ids()).unwrap(), &plain) < 1e-5);
    let (_, head) = peft
        .trainable_vars()
        .into_iter()
        .find(|(n, _)| n.ends_with("lm_head.weight"))
        .unwrap();
    head.set(&(head.as_tensor() * 1.5).unwrap()).unwrap();
    let changed = peft.forward(&ids()).unwrap();
    assert!(d(&changed, &plain) > 1e-3);
    assert_eq!(
        d(
            &peft.with_adapters_disabled(|m| m.forward(&ids()).unwrap()),
            &plain
        ),
        0.0
    );

    // Saved under PEFT's names, reloaded identically, merged into the weights.
    let dir = std::env::temp_dir().join(format!("peft-mts-{}", std::process::id()));
    peft.save_pretrained(&dir).unwrap();
    let again = PeftModel::from_pretrained(small_model_like(&peft), &dir).unwrap();
    assert_eq!(d(&again.forward(&ids()).unwrap(), &changed), 0.0);
    let merged = again.merge_and_unload().unwrap();
    assert!(d(&merged.forward(&ids()).unwrap(), &changed) < 1e-5);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A base model with the same frozen weights as `peft`'s (adapters disabled).
fn small_model_like(peft: &PeftModel) -> Model {
    let m = peft.model();
    let c = m.config().clone();
    let layers = m
        .layers()
        .iter()
        .map(|l| {
            let p = |lin: &dyn peft_prelude::model::Linear| lin.base().clone();
            let a = &l.self_attn;
            let qkv = |i| a.qkv.separate(i).expect("separate q, k, v");
            let gate_up = |i| l.mlp.gate_up.separate(i).expect("separate gate, up");
            peft_prelude::model::decoder::LayerWeights {
                input_layernorm: l.input_layernorm.weight().clone(),
                post_attention_layernorm: l.post_attention_layernorm.weight().clone(),
                projections: vec![
                    p(qkv(0)),
                    p(qkv(1)),
                    p(qkv(2)),
                    p(a.o_proj.as_ref()),
                    p(gate_up(0)),
                    p(gate_up(1)),
                    p(l.mlp.down_proj.as_ref()),
                ],
                qk_norms: None,
                feedforward_norms: None,
            }
        })
        .collect();
    let weights = ModelWeights {
        embed_tokens: m.embed_tokens().clone(),
        layers,
        norm: m.final_norm().weight().clone(),
        lm_head: Some(m.linear("lm_head").unwrap().base().weight().clone()),
    };
    Model::new(c, weights).unwrap()
}
