//! The decoder against transformers on the tiny-Mistral fixtures: full sequences longer than
//! the sliding window, a right-padded batch, KV-cached greedy decoding, and the GGUF files.

use candle_core::{DType, Device, Tensor};
use peft_prelude::generate::{generate_ids, GenerationConfig, Hooks};
use peft_prelude::model::{Forward, LoadOptions, Pretrained};
use peft_tests::{assert_logits_match, fixture, tensors};

const TOL: f32 = 1e-4;

fn tiny_mistral() -> Pretrained {
    Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default())
        .expect("load tiny-mistral")
}

#[test]
fn logits_match_with_sliding_window() {
    let p = tiny_mistral();
    assert_eq!(p.model.config().sliding_window, Some(8));
    let r = tensors("tiny-mistral/reference.safetensors");
    let ids = r["a.input_ids"].to_dtype(DType::U32).unwrap();
    assert_eq!(ids.dims(), &[1, 24], "longer than the window of 8");
    let logits = p.model.forward(&ids).unwrap();
    let worst = assert_logits_match(&logits, &r, "a", None, TOL);
    eprintln!("sliding window: max |diff| = {worst:e}");
}

#[test]
fn logits_match_without_sliding_window() {
    let mut p = tiny_mistral();
    p.model.set_sliding_window(None);
    let r = tensors("tiny-mistral/reference.safetensors");
    let ids = r["a.input_ids"].to_dtype(DType::U32).unwrap();
    let logits = p.model.forward(&ids).unwrap();
    assert_logits_match(&logits, &r, "a_no_sliding_window", None, TOL);
}

#[test]
fn right_padded_batch_with_attention_mask() {
    let p = tiny_mistral();
    let r = tensors("tiny-mistral/reference.safetensors");
    let ids = r["b.input_ids"].to_dtype(DType::U32).unwrap();
    let mask = r["b.attention_mask"].to_dtype(DType::U32).unwrap();
    let logits = p
        .model
        .forward_with(Forward::ids(&ids).with_attention_mask(&mask))
        .unwrap();
    let valid: Vec<Vec<bool>> = mask
        .to_vec2::<u32>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|m| m == 1).collect())
        .collect();
    assert!(
        valid[1].iter().filter(|v| !**v).count() == 11,
        "row 1 has 11 pads"
    );
    assert_logits_match(&logits, &r, "b", Some(&valid), TOL);
    // Finite everywhere, padded rows included (the mask is finite, not -inf).
    let all_finite = logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite());
    assert!(all_finite);
}

#[test]
fn kv_cached_greedy_decoding_matches_step_logits() {
    let p = tiny_mistral();
    let r = tensors("tiny-mistral/reference.safetensors");
    let prompt: Vec<u32> = r["c.prompt_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let expected: Vec<u32> = r["c.output_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let step_first = r["c.step_logits_first512"].to_vec2::<f32>().unwrap();

    // Step by step through the cache, comparing each step's logits.
    let mut cache = p.model.new_cache();
    let mut input = prompt.clone();
    let mut produced = vec![];
    let mut worst = 0f32;
    for step_logits in step_first.iter().take(12) {
        let ids = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = p
            .model
            .forward_last(Forward::ids(&ids).with_cache(&mut cache))
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in logits[..512].iter().zip(step_logits) {
            worst = worst.max((x - y).abs());
        }
        let next = peft_prelude::generate::sampling::argmax(&logits);
        produced.push(next);
        input = vec![next];
    }
    assert_eq!(produced, expected[prompt.len()..], "greedy tokens");
    assert!(worst <= TOL, "step logits differ by {worst}");
    assert!(
        cache.kept() <= 7,
        "the cache keeps only what the window of 8 can still see"
    );

    // The same through the generation loop.
    let config = GenerationConfig {
        eos_token_ids: vec![],
        ..GenerationConfig::default()
    }
    .greedy(12);
    let out = generate_ids(
        &p.model,
        &p.tokenizer,
        std::slice::from_ref(&prompt),
        &config,
        Hooks::default(),
    )
    .unwrap();
    assert_eq!(out.token_ids[0], expected[prompt.len()..]);
}

#[test]
fn batched_generation_equals_one_by_one() {
    let p = tiny_mistral();
    let config = GenerationConfig {
        eos_token_ids: vec![],
        ..GenerationConfig::default()
    }
    .greedy(10);
    let prompts = vec![
        p.tokenizer.encode("Once upon a time,", true).unwrap(),
        p.tokenizer
            .encode("The quick brown fox jumps over the lazy dog and then", true)
            .unwrap(),
    ];
    assert_ne!(prompts[0].len(), prompts[1].len(), "needs left padding");
    let batch = generate_ids(&p.model, &p.tokenizer, &prompts, &config, Hooks::default()).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let single = generate_ids(
            &p.model,
            &p.tokenizer,
            std::slice::from_ref(prompt),
            &config,
            Hooks::default(),
        )
        .unwrap();
        assert_eq!(batch.token_ids[i], single.token_ids[0], "prompt {i}");
    }
}

fn gguf_case(kind: &str) {
    let p = Pretrained::from_gguf(
        fixture(&format!("gguf/tiny-mistral-{kind}.gguf")),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(
        p.model.config().sliding_window,
        None,
        "GGUF carries no window"
    );
    assert!(!p.model.config().tie_word_embeddings);
    let r = tensors("gguf/reference.safetensors");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = p.model.forward(&ids).unwrap();
    let worst = assert_logits_match(&logits, &r, &format!("{kind}.full_causal"), None, TOL);
    eprintln!("{kind}: max |diff| = {worst:e}");
}

#[test]
fn gguf_f32_matches_reference() {
    gguf_case("f32");
}

#[test]
fn gguf_q8_0_matches_reference() {
    gguf_case("q8_0");
}

#[test]
fn gguf_q4_0_matches_reference() {
    gguf_case("q4_0");
}
