//! Tests of the decoder: gradients through every layer against finite differences, ids vs
//! embeddings, prefixes in the cache, fused ops vs compositions, packed sequences, paths.

use super::*;
use crate::model::config::Architecture;
use crate::model::mask::{attention_bias, AttentionLayout};
use candle_core::Var;

fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Mistral,
        vocab_size: 50,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        max_position_embeddings: 64,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        sliding_window: Some(4),
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_id: vec![2],
        variant: Default::default(),
        hf_config: None,
    }
}

fn tiny_model() -> Model {
    let config = tiny_config();
    let weights = ModelWeights::random(&config, 0.3, DType::F64, &Device::Cpu).unwrap();
    Model::new(config, weights).unwrap()
}

/// `sum(f(x) * c)` and its gradient at `x`, by autograd.
fn loss_and_grad(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, c: &Tensor) -> (f64, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let loss = (f(v.as_tensor()) * c).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(v.as_tensor())
        .expect("a gradient reaches the input")
        .clone();
    (loss.to_scalar::<f64>().unwrap(), g)
}

/// Central differences on every coordinate of a small `x`.
fn check_against_finite_differences(name: &str, f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor) {
    let c = Tensor::randn(0f64, 1., f(x).shape(), x.device()).unwrap();
    let (_, g) = loss_and_grad(f, x, &c);
    let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-5;
    let loss_at = |v: &[f64]| -> f64 {
        let t = Tensor::from_slice(v, x.shape(), x.device()).unwrap();
        (f(&t) * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let mut worst = 0f64;
    for i in 0..xs.len() {
        let mut plus = xs.clone();
        plus[i] += eps;
        let mut minus = xs.clone();
        minus[i] -= eps;
        let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps);
        worst = worst.max((numeric - g[i]).abs() / (1.0 + numeric.abs()));
    }
    assert!(
        worst < 1e-6,
        "{name}: autograd and finite differences differ by {worst}"
    );
}

/// A tiny model with every family switch on: q/k/v/o biases, per-head q/k norms, (1 + w)
/// norms, GeGLU, scaled embeddings, sandwich norms, both soft-caps, a query scalar, mixed
/// full and sliding layers with their own RoPE.
/// `fused`: Phi-3's `qkv_proj` and `gate_up_proj` instead of separate projections.
fn tiny_variant_model(fused: bool) -> Model {
    use crate::model::rope_scaling::RopeScaling;
    use crate::model::variant::{Activation, AttentionBias, LayerKind, Variant};
    let mut config = tiny_config();
    config.variant = Variant {
        attention_bias: AttentionBias::QkvO,
        qk_norm: true,
        norm_unit_offset: true,
        activation: Activation::GeluTanh,
        scale_embeddings: true,
        sandwich_norms: true,
        attn_logit_softcapping: Some(3.0),
        final_logit_softcapping: Some(5.0),
        query_pre_attn_scalar: Some(6.0),
        layer_types: vec![LayerKind::Sliding, LayerKind::Full, LayerKind::Sliding],
        rope_scaling: RopeScaling::Linear { factor: 2.0 },
        local_rope: Some((100.0, RopeScaling::Default)),
        fused_projections: fused,
    };
    let weights = ModelWeights::random(&config, 0.3, DType::F64, &Device::Cpu).unwrap();
    Model::new(config, weights).unwrap()
}

#[test]
fn gradients_are_exact_through_every_family_switch() {
    for fused in [false, true] {
        let model = tiny_variant_model(fused);
        let h = model.config.hidden_size;
        let x = Tensor::randn(0f64, 1., (1, 6, h), &Device::Cpu).unwrap();
        check_against_finite_differences(
            &format!("whole variant model (fused projections: {fused})"),
            &|x: &Tensor| model.forward_with(Forward::embeds(x)).unwrap(),
            &x,
        );
    }
}

#[test]
fn kv_cache_reproduces_full_forward_with_every_family_switch() {
    let model = tiny_variant_model(true);
    let ids = Tensor::new(&[[3u32, 7, 1, 9, 4, 4, 8, 2, 5]], &Device::Cpu).unwrap();
    let full = model.forward(&ids).unwrap();
    let mut cache = model.new_cache();
    for t in 0..9 {
        let step = model
            .forward_last(Forward::ids(&ids.narrow(1, t, 1).unwrap()).with_cache(&mut cache))
            .unwrap();
        let want = full.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        let d = (step - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-9, "step {t}: {d}");
    }
}

#[test]
fn gradient_reaches_the_input_of_every_layer_exactly() {
    let model = tiny_model();
    let (b, t, h) = (2, 6, model.config.hidden_size);
    let positions =
        Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &Device::Cpu).unwrap();
    let (cos, sin) = model.rope.tables(&positions).unwrap();
    let layout = AttentionLayout {
        batch: b,
        seq: t,
        cache_start: 0,
        past: 0,
        window: model.config.sliding_window,
        cached_key_mask: None,
        new_key_mask: None,
        segments: None,
    };
    let mask = attention_bias(&layout, &Device::Cpu).unwrap();
    assert!(mask.is_some(), "6 tokens with a window of 4 need a mask");
    let mask = mask.map(|m| m.to_dtype(DType::F64).unwrap());
    // Every layer of the tiny Mistral slides.
    let pass = Pass {
        full: None,
        sliding: Some(Tables { cos, sin, mask }),
    };
    for (i, layer) in model.layers.iter().enumerate() {
        let x = Tensor::randn(0f64, 1., (b, t, h), &Device::Cpu).unwrap();
        let f = |x: &Tensor| layer.forward(x, &pass, None).unwrap();
        check_against_finite_differences(&format!("layer {i}"), &f, &x);
    }
    // The final norm and the head, and the whole model from its input embeddings.
    let x = Tensor::randn(0f64, 1., (1, 3, h), &Device::Cpu).unwrap();
    check_against_finite_differences(
        "final norm + lm_head",
        &|x: &Tensor| {
            model
                .lm_head
                .forward(&model.norm.forward(x).unwrap())
                .unwrap()
        },
        &x,
    );
    check_against_finite_differences(
        "whole model",
        &|x: &Tensor| model.forward_with(Forward::embeds(x)).unwrap(),
        &x,
    );
}

#[test]
fn ids_and_embeddings_give_the_same_logits() {
    let model = tiny_model();
    let ids = Tensor::new(&[[3u32, 7, 1, 9, 4]], &Device::Cpu).unwrap();
    let a = model.forward(&ids).unwrap();
    let b = model
        .forward_with(Forward::embeds(&model.embed(&ids).unwrap()))
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn a_prefix_in_the_cache_acts_as_earlier_tokens() {
    // Running [p; x] equals running x with p's keys/values as a prefix (prefix tuning's
    // mechanism), when the prefix keys are the ones p itself produced.
    let mut model = tiny_model();
    model.set_sliding_window(None);
    let all = Tensor::new(&[[5u32, 8, 2, 9, 4, 11, 3]], &Device::Cpu).unwrap();
    let full = model.forward(&all).unwrap().narrow(1, 3, 4).unwrap();
    let mut cache = model.new_cache();
    model
        .forward_with(Forward::ids(&all.narrow(1, 0, 3).unwrap()).with_cache(&mut cache))
        .unwrap();
    let prefix = (0..model.layers.len())
        .map(|i| cache.layer(i).unwrap().clone())
        .collect();
    let mut prefixed = KvCache::from_prefix(prefix, None).unwrap();
    let rest = model
        .forward_with(Forward::ids(&all.narrow(1, 3, 4).unwrap()).with_cache(&mut prefixed))
        .unwrap();
    let diff = (full - rest)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff < 1e-10, "{diff}");
}

#[test]
fn fused_norm_and_rope_equal_their_compositions() {
    // The decoder runs the fused ops; the plain candle compositions are the reference.
    let model = tiny_model();
    let x = Tensor::randn(0f64, 1., (2, 5, 16), &Device::Cpu).unwrap();
    let norm = &model.layers[0].input_layernorm;
    let d = (norm.forward(&x).unwrap() - norm.forward_unfused(&x).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12, "rms_norm: {d}");
    let q = Tensor::randn(0f64, 1., (2, 4, 5, 4), &Device::Cpu).unwrap();
    let positions = Tensor::new(&[[0u32, 1, 2, 3, 4]], &Device::Cpu).unwrap();
    let (cos, sin) = model.rope.tables(&positions).unwrap();
    let d = (Rope::apply(&q, &cos, &sin).unwrap() - Rope::apply_unfused(&q, &cos, &sin).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-6, "rope: {d}");
}

#[test]
fn packed_segments_equal_separate_runs() {
    // Two examples packed in one row with restarted positions give the logits each
    // gives alone.
    let model = tiny_model();
    let a = Tensor::new(&[[5u32, 8, 2]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[9u32, 4, 11, 3, 7]], &Device::Cpu).unwrap();
    let packed = Tensor::cat(&[&a, &b], 1).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2, 0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
    let seg = Tensor::new(&[[0u32, 0, 0, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let out = model
        .forward_with(
            Forward::ids(&packed)
                .with_position_ids(&pos)
                .with_segment_ids(&seg),
        )
        .unwrap();
    let want = Tensor::cat(
        &[&model.forward(&a).unwrap(), &model.forward(&b).unwrap()],
        1,
    )
    .unwrap();
    let diff = (out - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff < 1e-10, "{diff}");
}

#[test]
fn every_projection_has_a_path() {
    let model = tiny_model();
    let paths = model.linear_paths();
    assert_eq!(paths.len(), 3 * 7 + 1);
    assert!(paths.contains(&"model.layers.2.mlp.down_proj".to_string()));
    assert!(paths.contains(&"lm_head".to_string()));
    for p in &paths {
        assert!(model.linear(p).is_ok(), "{p}");
    }
    let err = model.linear("model.layers.1.self_attn.q_prj").unwrap_err();
    assert!(
        err.to_string().contains("model.layers.1.self_attn.q_proj"),
        "{err}"
    );
}
