//! Generation goes through the adapter, whatever the method: for LoRA, DoRA, IA3, prompt
//! tuning, P-tuning, prefix tuning and bottleneck adapters, the KV-cached greedy continuation
//! equals the one computed by full forward passes of the same `PeftModel` (the reference:
//! no cache, every position recomputed), and a trained adapter changes the text. Generation
//! once took a `PeftModel` as its bare base (a `Deref`) and silently dropped virtual tokens
//! and prefixes: these tests failed then.

use candle_core::{DType, Tensor, D};
use peft_prelude::generate::{generate_ids, GenerationConfig, Hooks};
use peft_prelude::model::{CausalLm, Forward, LoadOptions, Model, Pretrained};
use peft_prelude::peft::{
    get_peft_model, BottleneckConfig, Ia3Config, LoraConfig, LoraInit, PeftConfig, PeftModel,
    PrefixTuningConfig, PromptEncoderConfig, PromptLearningCommon, PromptTuningConfig,
};
use peft_prelude::rng::Rng;
use peft_prelude::tokenizer::Tokenizer;
use peft_tests::fixture;

const NEW_TOKENS: usize = 10;

fn base() -> (Model, Tokenizer) {
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    (p.model, p.tokenizer)
}

fn prompt_ids() -> Vec<u32> {
    // "<s> Once upon a time," (the fixtures' generation prompt).
    vec![1, 5713, 3714, 264, 727, 28725]
}

/// Every trainable value replaced by seeded noise: what training would leave, so the adapter
/// visibly changes the model (many methods start as a no-op).
fn as_if_trained(peft: &PeftModel, scale: f64) {
    let mut rng = Rng::new(7);
    for (_, var) in peft.trainable_vars() {
        let noise = rng.normal(var.elem_count(), 0.0, scale);
        // Multiplicative methods (IA3, DoRA's magnitude) stay near their identity value.
        let noise: Vec<f32> = if var.rank() == 1 {
            noise.iter().map(|x| 1.0 + 0.5 * x).collect()
        } else {
            noise
        };
        let value = Tensor::from_vec(noise, var.shape(), var.device())
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        var.set(&value).unwrap();
    }
}

/// Greedy decoding by full recomputation: at each step the whole sequence goes through
/// [`CausalLm::logits`] without a cache.
fn greedy_without_cache(model: &dyn CausalLm, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    let mut out = vec![];
    for _ in 0..steps {
        let input = Tensor::new(ids.as_slice(), model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.logits(Forward::ids(&input)).unwrap();
        assert_eq!(
            logits.dim(1).unwrap(),
            ids.len(),
            "one row per input position"
        );
        let last = logits.narrow(1, ids.len() - 1, 1).unwrap();
        let next = last
            .to_dtype(DType::F32)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()[0];
        ids.push(next);
        out.push(next);
    }
    out
}

fn greedy_cached(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
) -> Vec<Vec<u32>> {
    let config = GenerationConfig {
        eos_token_ids: vec![],
        ..GenerationConfig::default().greedy(NEW_TOKENS)
    };
    generate_ids(model, tokenizer, prompts, &config, Hooks::default())
        .unwrap()
        .token_ids
}

fn check(name: &str, config: impl Into<PeftConfig>, scale: f64) {
    let (model, tokenizer) = base();
    let prompt = prompt_ids();
    let base_text = greedy_cached(&model, &tokenizer, std::slice::from_ref(&prompt));
    let peft = get_peft_model(model, config).unwrap();
    as_if_trained(&peft, scale);
    let cached = greedy_cached(&peft, &tokenizer, std::slice::from_ref(&prompt));
    let reference = greedy_without_cache(&peft, &prompt, NEW_TOKENS);
    assert_eq!(
        cached[0], reference,
        "{name}: KV-cached greedy decoding differs from full recomputation"
    );
    assert_ne!(
        cached[0], base_text[0],
        "{name}: the adapter does not change the generated text"
    );
    // With the adapter switched off, the PEFT model decodes as its base.
    let off = peft
        .with_adapters_disabled(|p| greedy_cached(p, &tokenizer, std::slice::from_ref(&prompt)));
    assert_eq!(off[0], base_text[0], "{name}: disabled adapter still acts");

    // A left-padded batch: the shorter prompt's row equals its own run (positions and
    // masks of the virtual tokens and prefixes carry through the padding). Without the
    // sliding window, which counts padding slots like any other.
    let mut peft = peft;
    peft.model_mut().set_sliding_window(None);
    let cached = greedy_cached(&peft, &tokenizer, std::slice::from_ref(&prompt));
    assert_eq!(
        cached[0],
        greedy_without_cache(&peft, &prompt, NEW_TOKENS),
        "{name}: without window"
    );
    let short = prompt[..3].to_vec();
    let batch = greedy_cached(&peft, &tokenizer, &[prompt.clone(), short.clone()]);
    assert_eq!(batch[0], cached[0], "{name}: batched row 0");
    let alone = greedy_cached(&peft, &tokenizer, std::slice::from_ref(&short));
    assert_eq!(batch[1], alone[0], "{name}: left-padded row 1");
    eprintln!("{name}: cached = recomputed = {:?}", cached[0]);
}

fn prompt_common(n: usize) -> PromptLearningCommon {
    PromptLearningCommon {
        num_virtual_tokens: n,
        ..Default::default()
    }
}

#[test]
fn lora_generates_through_the_adapter() {
    check(
        "lora",
        LoraConfig {
            init_lora_weights: LoraInit::Bool(false),
            ..LoraConfig::all_projections(4, 8.0)
        },
        0.3,
    );
}

#[test]
fn dora_generates_through_the_adapter() {
    check(
        "dora",
        LoraConfig {
            use_dora: true,
            use_rslora: true,
            ..LoraConfig::all_projections(4, 8.0)
        },
        0.3,
    );
}

#[test]
fn ia3_generates_through_the_adapter() {
    check("ia3", Ia3Config::default(), 1.0);
}

#[test]
fn prompt_tuning_generates_through_the_virtual_tokens() {
    check(
        "prompt tuning",
        PromptTuningConfig {
            prompt: prompt_common(8),
            ..Default::default()
        },
        1.0,
    );
}

#[test]
fn p_tuning_generates_through_the_encoder() {
    for encoder in ["MLP", "LSTM"] {
        check(
            &format!("p-tuning {encoder}"),
            PromptEncoderConfig {
                prompt: prompt_common(5),
                encoder_reparameterization_type: encoder.into(),
                encoder_hidden_size: Some(32),
                encoder_num_layers: 1,
                ..Default::default()
            },
            0.5,
        );
    }
}

#[test]
fn prefix_tuning_generates_through_the_prefixes() {
    for projection in [false, true] {
        check(
            &format!("prefix tuning (projection {projection})"),
            PrefixTuningConfig {
                prompt: prompt_common(6),
                prefix_projection: projection,
                encoder_hidden_size: Some(32),
                ..Default::default()
            },
            1.0,
        );
    }
}

#[test]
fn bottleneck_adapters_generate_through_the_adapter() {
    check("bottleneck (houlsby)", BottleneckConfig::houlsby(), 0.5);
    check("bottleneck (parallel)", BottleneckConfig::parallel(), 0.5);
}
