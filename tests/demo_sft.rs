//! The demonstration: SmolLM2-135M with LoRA learns the example task (label a review's mood
//! with the code words "glad"/"sad") in a few minutes on 2 cores: the training loss falls by
//! at least half and held-out prompts are answered correctly where they were not before.

use peft_prelude::data::{alpaca_prompt, format_alpaca, Dataset};
use peft_prelude::generate::{generate, GenerationConfig};
use peft_prelude::model::{CausalLm, LoadOptions, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig};
use peft_prelude::tokenizer::Tokenizer;
use peft_prelude::train::{SftTrainer, TrainingArgs};
use peft_tests::smollm2_gguf;

fn data(name: &str) -> Dataset {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../notebooks/data")
        .join(name);
    Dataset::from_json_file(path).unwrap()
}

/// Fraction of rows whose greedy answer starts with the expected label.
fn accuracy(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    rows: &Dataset,
    config: &GenerationConfig,
) -> (f64, Vec<String>) {
    let mut answers = vec![];
    let mut correct = 0;
    for i in 0..rows.len() {
        let prompt = alpaca_prompt(
            rows.text(i, "instruction").unwrap(),
            rows.text(i, "input").unwrap(),
            "",
        );
        let out = generate(model, tokenizer, &prompt, config, None).unwrap();
        let answer = out.text().trim().to_lowercase();
        if answer.starts_with(rows.text(i, "output").unwrap()) {
            correct += 1;
        }
        answers.push(answer);
    }
    (correct as f64 / rows.len() as f64, answers)
}

#[test]
fn lora_learns_the_example_task() {
    let p = Pretrained::from_gguf(smollm2_gguf(), &LoadOptions::default()).unwrap();
    let eos = p.tokenizer.eos_token().unwrap().to_string();
    let (train, test) = (data("mood_train.json"), data("mood_test.json"));
    let gen = p.generation_config.clone().greedy(3);

    let (before, before_answers) = accuracy(&p.model, &p.tokenizer, &test, &gen);
    let peft = get_peft_model(p.model, LoraConfig::all_projections(16, 16.0)).unwrap();
    let out_dir = std::env::temp_dir().join(format!("peft-demo-{}", std::process::id()));
    let args = TrainingArgs {
        output_dir: out_dir.clone(),
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 1,
        learning_rate: 1e-3,
        max_steps: 24,
        warmup_steps: 2,
        logging_steps: 4,
        max_seq_length: 128,
        seed: 3407,
        ..Default::default()
    };
    let mut trainer = SftTrainer::new(
        peft,
        p.tokenizer.clone(),
        &format_alpaca(&train, &eos).unwrap(),
        args,
    )
    .unwrap();
    let result = trainer.train().unwrap();
    let losses: Vec<f64> = trainer.history().entries.iter().map(|e| e.loss).collect();
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    let peft = trainer.into_model();
    let (after, after_answers) = accuracy(&peft, &p.tokenizer, &test, &gen);
    eprintln!(
        "held-out accuracy: before {:.0}% ({:?}…), after {:.0}% ({:?}…); loss {first:.3} → {last:.3}; {} steps in {:.0} s ({:.0} tokens/s)",
        before * 100.0,
        &before_answers[..3],
        after * 100.0,
        &after_answers[..3],
        result.global_step,
        result.train_runtime,
        result.train_tokens_per_second
    );
    assert!(
        last <= first / 2.0,
        "loss fell from {first} to {last}: not by half"
    );
    assert!(
        before <= 0.5,
        "the base model already knows the task ({before})"
    );
    assert!(
        after >= 0.9,
        "after training only {after} of held-out prompts are right: {after_answers:?}"
    );
    let _ = std::fs::remove_dir_all(out_dir);
}
