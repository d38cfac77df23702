//! Issue 8's QLoRA criterion "its loss curve on the example task within noise of the f32 one":
//! trains LoRA (r=16, all seven projections) on the notebook's example task
//! (`notebooks/data/mood_train.json`, Alpaca format) with the demonstration's settings (24
//! steps, batch 4, lr 1e-3), over the dense f32 base and over the NF4 base (QLoRA, double
//! quantization, in training on the integer products where the CPU has them), each with
//! SEEDS seeds (default 3; a seed sets the data order and the adapter initialisation). The
//! seeds' spread is the noise: per step, the two mean curves are compared against twice the
//! standard error of their difference. Prints one JSON line: both mean curves with their
//! standard errors, the mean of the last six steps, and the steps outside the noise.
//!
//! ```text
//! cargo run --release -p peft_prelude --example qlora_loss_curve [-- MODEL [SEEDS [exact]]]
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

/// Per step: mean over runs, and the standard error of that mean.
fn mean_and_error(runs: &[Vec<f64>]) -> Vec<(f64, f64)> {
    let k = runs.len() as f64;
    (0..runs[0].len())
        .map(|i| {
            let mean = runs.iter().map(|r| r[i]).sum::<f64>() / k;
            let var = runs.iter().map(|r| (r[i] - mean).powi(2)).sum::<f64>() / (k - 1.0).max(1.0);
            (mean, (var / k).sqrt())
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| peft_prelude::setup::smollm2().display().to_string());
    let seeds: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    // `exact`: the NF4 runs dequantize to f32 for every product instead of the integer GEMM.
    if std::env::args().nth(3).as_deref() == Some("exact") {
        peft_prelude::quant::set_integer_products(false);
    }
    let mut f32_runs = Vec::new();
    let mut nf4_runs = Vec::new();
    for seed in 3407..3407 + seeds as u64 {
        f32_runs.push(curve(&model, Quantization::None, seed)?);
        nf4_runs.push(curve(&model, Quantization::QLORA, seed)?);
    }
    let (f, q) = (mean_and_error(&f32_runs), mean_and_error(&nf4_runs));
    // A step is outside the noise when the two means differ by more than twice the standard
    // error of their difference (the seeds' spread: data order and adapter initialisation).
    let outside: Vec<usize> = f
        .iter()
        .zip(&q)
        .enumerate()
        .filter(|(_, ((mf, ef), (mq, eq)))| (mf - mq).abs() > 2.0 * (ef * ef + eq * eq).sqrt())
        .map(|(i, _)| i + 1)
        .collect();
    let fmt = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        v.iter()
            .map(|x| format!("{:.4}", pick(x)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let tail = |v: &[(f64, f64)]| v[v.len() - 6..].iter().map(|x| x.0).sum::<f64>() / 6.0;
    println!(
        "{{\"bench\":\"qlora_loss_curve\",\"steps\":{},\"seeds\":{seeds},\"integer_products\":{},\
         \"f32_mean\":[{}],\"f32_stderr\":[{}],\"nf4_mean\":[{}],\"nf4_stderr\":[{}],\
         \"f32_last6_mean\":{:.4},\"nf4_last6_mean\":{:.4},\"steps_outside_2se\":{:?}}}",
        f.len(),
        peft_prelude::quant::integer_products(),
        fmt(&f, |x| x.0),
        fmt(&f, |x| x.1),
        fmt(&q, |x| x.0),
        fmt(&q, |x| x.1),
        tail(&f),
        tail(&q),
        outside
    );
    Ok(())
}
