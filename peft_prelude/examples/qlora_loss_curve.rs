//! Issue 8's QLoRA criterion "its loss curve on the example task within noise of the f32 one":
//! trains LoRA (r=16, all seven projections) on the notebook's example task
//! (`notebooks/data/mood_train.json`, Alpaca format) three times with the demonstration's
//! settings (24 steps, batch 4, lr 1e-3): over the dense f32 base and over the NF4 base
//! (QLoRA, double quantization) with the same seed, and over the f32 base with another seed.
//! The last run is the noise yardstick: how far two f32 runs that differ only in data order and
//! adapter initialisation drift apart. Prints one JSON line with the three curves and the
//! mean and largest absolute differences.
//!
//! ```text
//! cargo run --release -p peft_prelude --example qlora_loss_curve [-- MODEL]
//! ```

use peft_prelude::data::{format_alpaca, Dataset};
use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig};
use peft_prelude::quant::Quantization;
use peft_prelude::train::{SftTrainer, TrainingArgs};

fn curve(model: &str, quantization: Quantization, seed: u64) -> anyhow::Result<Vec<f64>> {
    let p = Pretrained::load(
        model,
        &LoadOptions::default().with_quantization(quantization),
    )?;
    let eos = p.tokenizer.eos_token().unwrap_or_default().to_string();
    let data_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../notebooks/data/mood_train.json");
    let train = Dataset::from_json_file(data_path)?;
    let peft = get_peft_model(p.model, LoraConfig::all_projections(16, 16.0))?;
    let out_dir = std::env::temp_dir().join(format!("peft-qlora-curve-{}", std::process::id()));
    let args = TrainingArgs {
        output_dir: out_dir.clone(),
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 1,
        learning_rate: 1e-3,
        max_steps: 24,
        warmup_steps: 2,
        logging_steps: 1,
        max_seq_length: 128,
        seed,
        ..Default::default()
    };
    let mut trainer = SftTrainer::new(
        peft,
        p.tokenizer.clone(),
        &format_alpaca(&train, &eos)?,
        args,
    )?;
    trainer.train()?;
    let _ = std::fs::remove_dir_all(out_dir);
    Ok(trainer.history().entries.iter().map(|e| e.loss).collect())
}

fn differences(a: &[f64], b: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x - y).abs()).collect();
    let mean = d.iter().sum::<f64>() / d.len().max(1) as f64;
    (mean, d.iter().cloned().fold(0.0, f64::max))
}

fn main() -> anyhow::Result<()> {
    let model = std::env::args().nth(1).unwrap_or_else(|| {
        let dir = std::env::var("PEFT_MODELS_DIR").unwrap_or_else(|_| {
            format!(
                "{}/.cache/peft-models",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        format!("{dir}/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let f32_curve = curve(&model, Quantization::None, 3407)?;
    let nf4_curve = curve(&model, Quantization::QLORA, 3407)?;
    let f32_other_seed = curve(&model, Quantization::None, 3408)?;
    let (nf4_mean, nf4_max) = differences(&nf4_curve, &f32_curve);
    let (seed_mean, seed_max) = differences(&f32_other_seed, &f32_curve);
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "{{\"bench\":\"qlora_loss_curve\",\"steps\":{},\"f32\":[{}],\"nf4\":[{}],\"f32_seed_3408\":[{}],\
         \"nf4_vs_f32_mean_abs\":{nf4_mean:.4},\"nf4_vs_f32_max_abs\":{nf4_max:.4},\
         \"seed_vs_seed_mean_abs\":{seed_mean:.4},\"seed_vs_seed_max_abs\":{seed_max:.4}}}",
        f32_curve.len(),
        fmt(&f32_curve),
        fmt(&nf4_curve),
        fmt(&f32_other_seed)
    );
    Ok(())
}
