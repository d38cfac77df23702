//! The SFT trainer on the tiny Mistral: resuming from a checkpoint reproduces the
//! uninterrupted run exactly; bad input gives clear errors.

use peft_prelude::data::Dataset;
use peft_prelude::model::{CausalLm, LoadOptions, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig};
use peft_prelude::train::{SftTrainer, TrainingArgs};
use peft_prelude::Error;
use peft_tests::{fixture, max_abs, max_abs_diff};

fn dataset(n: usize) -> Dataset {
    let rows: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Question {i}: what comes after {i}?"),
                "completion": format!(" The answer is {}.</s>", i + 1),
            })
        })
        .collect();
    Dataset::from_records(&rows).unwrap()
}

fn trainer(
    out: &std::path::Path,
    max_steps: i64,
    lr: f64,
    data: &Dataset,
) -> peft_prelude::Result<SftTrainer> {
    trainer_with(out, max_steps, lr, data, false)
}

fn trainer_with(
    out: &std::path::Path,
    max_steps: i64,
    lr: f64,
    data: &Dataset,
    gradient_checkpointing: bool,
) -> peft_prelude::Result<SftTrainer> {
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let peft = get_peft_model(p.model, LoraConfig::all_projections(4, 8.0)).unwrap();
    let args = TrainingArgs {
        output_dir: out.to_path_buf(),
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        learning_rate: lr,
        max_steps,
        warmup_steps: 1,
        logging_steps: 1,
        max_seq_length: 32,
        weight_decay: 0.01,
        gradient_checkpointing,
        ..Default::default()
    };
    SftTrainer::new(peft, p.tokenizer, data, args)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("peft-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn resuming_from_a_checkpoint_reproduces_the_straight_run() {
    let data = dataset(10);
    let out = scratch("straight");
    let mut straight = trainer(&out, 6, 1e-2, &data).unwrap();
    let full = straight.train().unwrap();
    assert_eq!(full.global_step, 6);
    let straight_losses: Vec<f64> = straight.history().entries.iter().map(|e| e.loss).collect();
    assert!(
        straight_losses.last().unwrap() < straight_losses.first().unwrap(),
        "{straight_losses:?}"
    );

    let out2 = scratch("halves");
    let mut first = trainer(&out2, 6, 1e-2, &data).unwrap();
    // Train 3 of the 6 steps (same schedule), checkpoint, continue in a brand-new trainer.
    first.train_steps(3).unwrap();
    assert_eq!(first.state().global_step, 3);
    let ckpt = first.save_checkpoint().unwrap();
    assert!(ckpt.ends_with("checkpoint-3"));
    let mut second = trainer(&out2, 6, 1e-2, &data).unwrap();
    second.resume_from_checkpoint(&ckpt).unwrap();
    second.train().unwrap();
    let resumed: Vec<f64> = second.history().entries.iter().map(|e| e.loss).collect();
    assert_eq!(resumed, straight_losses, "same loss trajectory");
    for ((n, a), (_, b)) in straight
        .model()
        .trainable_vars()
        .iter()
        .zip(second.model().trainable_vars())
    {
        let d = max_abs_diff(a.as_tensor(), b.as_tensor());
        assert_eq!(d, 0.0, "{n}");
    }
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(out2).unwrap();
}

#[test]
fn nan_loss_stops_with_the_step() {
    let out = scratch("nan");
    let mut t = trainer(&out, 50, 1e9, &dataset(6)).unwrap();
    let err = t.train().unwrap_err().to_string();
    assert!(err.contains("loss is") && err.contains("at step"), "{err}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_inputs() {
    let out = scratch("bad");
    let err = trainer(&out, 2, 1e-3, &Dataset::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("empty"), "{err}");

    let missing = Dataset::from_records(&[serde_json::json!({"prompt": "only a prompt"})]).unwrap();
    let err = trainer(&out, 2, 1e-3, &missing).err().unwrap().to_string();
    assert!(err.contains("row 0") && err.contains("text"), "{err}");

    // Longer than max_seq_length: truncated, and still trains.
    let long = Dataset::from_records(&[serde_json::json!({"text": "word ".repeat(200)})]).unwrap();
    let mut t = trainer(&out, 1, 1e-3, &long).unwrap();
    t.train().unwrap();

    // A file where the output directory should be.
    let file = out.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = trainer(&file, 2, 1e-3, &dataset(4)).err().unwrap();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn the_fused_loss_equals_the_logits_path() {
    use peft_prelude::data::{pad_batch, Example};
    use peft_prelude::train::{causal_lm_loss, sft::batch_loss};
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let peft = get_peft_model(
        p.model,
        LoraConfig {
            init_lora_weights: peft_prelude::peft::LoraInit::Bool(false),
            ..LoraConfig::all_projections(4, 8.0)
        },
    )
    .unwrap();
    let ex = |ids: &[u32], masked: usize| Example {
        input_ids: ids.to_vec(),
        labels: ids
            .iter()
            .enumerate()
            .map(|(i, &id)| if i < masked { -100 } else { id as i64 })
            .collect(),
    };
    let (a, b) = (
        ex(&[1, 415, 2936, 9060, 285, 1142, 461], 2),
        ex(&[1, 5713, 3714, 264, 727], 3),
    );
    let batch = pad_batch(&[&a, &b], 2, &candle_core::Device::Cpu).unwrap();
    let (fused, n_fused) = batch_loss(&peft, &batch).unwrap();
    let logits = peft.logits(batch.forward()).unwrap();
    let (plain, n_plain) = causal_lm_loss(&logits, &batch.labels).unwrap();
    assert_eq!(n_fused, n_plain);
    let (lf, lp) = (
        fused.to_scalar::<f32>().unwrap(),
        plain.to_scalar::<f32>().unwrap(),
    );
    assert!((lf - lp).abs() < 1e-5 * lp.abs().max(1.0), "{lf} vs {lp}");
    let (gf, gp) = (fused.backward().unwrap(), plain.backward().unwrap());
    for (name, var) in peft.trainable_vars() {
        let d = max_abs_diff(
            gf.get(var.as_tensor()).unwrap(),
            gp.get(var.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{name}: {d}");
    }
}

#[test]
fn gradient_checkpointing_trains_exactly_like_the_plain_backward() {
    let data = dataset(8);
    let run = |checkpointing: bool| {
        let out = scratch(&format!("ckpt-{checkpointing}"));
        let mut t = trainer_with(&out, 4, 1e-2, &data, checkpointing).unwrap();
        t.train().unwrap();
        let losses: Vec<f64> = t.history().entries.iter().map(|e| e.loss).collect();
        let norms: Vec<f64> = t.history().entries.iter().map(|e| e.grad_norm).collect();
        let weights: Vec<Vec<f32>> = t
            .model()
            .trainable_vars()
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        std::fs::remove_dir_all(out).unwrap();
        (losses, norms, weights)
    };
    let (plain_loss, plain_norm, plain_w) = run(false);
    let (ck_loss, ck_norm, ck_w) = run(true);
    // After step 1 every lora_B is non-zero, so the A gradients are exercised too.
    assert!(plain_loss[3] < plain_loss[0], "{plain_loss:?}");
    for (a, b) in plain_loss
        .iter()
        .zip(&ck_loss)
        .chain(plain_norm.iter().zip(&ck_norm))
    {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{plain_loss:?} {ck_loss:?}"
        );
    }
    let worst = plain_w
        .iter()
        .flatten()
        .zip(ck_w.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "adapter weights differ by {worst}");
}

#[test]
fn layer_by_layer_backwards_equal_candles_own_backward() {
    use candle_core::{Device, Tensor};
    use peft_prelude::data::{pad_batch, Example};
    use peft_prelude::model::Checkpointing;
    use peft_prelude::train::sft::{batch_gradients, batch_loss};
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let peft = get_peft_model(p.model, LoraConfig::all_projections(4, 8.0)).unwrap();
    peft.train();
    let vars: Vec<_> = peft.trainable_vars().into_iter().map(|(_, v)| v).collect();
    // Non-zero B, so that every A gets a gradient too.
    for v in &vars {
        if v.dims()[1] == 4 {
            v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let ex = |ids: Vec<u32>| Example {
        labels: ids.iter().map(|&i| i as i64).collect(),
        input_ids: ids,
    };
    let (a, b) = (ex(vec![5, 17, 99, 3, 42, 8, 11]), ex(vec![7, 7, 250, 31]));
    let batch = pad_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
    let (loss, count) = batch_loss(&peft, &batch).unwrap();
    let store = loss.backward().unwrap();
    let want: Vec<Tensor> = vars
        .iter()
        .map(|v| store.get(v.as_tensor()).unwrap().clone())
        .collect();
    // Every layer kept, every layer recomputed, and the first of the two recomputed.
    for recompute in [
        Checkpointing::Off,
        Checkpointing::All,
        Checkpointing::FirstLayers(1),
    ] {
        let (value, n, got) =
            batch_gradients(&peft, &batch, 1.0 / count as f64, &vars, recompute).unwrap();
        assert_eq!(n, count);
        assert!((value - loss.to_scalar::<f32>().unwrap() as f64).abs() < 1e-6);
        for (g, w) in got.iter().zip(&want) {
            let g = g.as_ref().expect("every adapter gets a gradient");
            let (scale, diff) = (max_abs(w), max_abs_diff(g, w));
            assert!(
                scale > 0.0 && diff <= 1e-5 * scale,
                "{recompute:?}: {diff} of {scale}"
            );
        }
    }
}

/// The one training loop takes any objective: a third trainer is an `Objective` (here: make
/// the model say token 42 after each unit's prompt) and `Trainer::with_objective`. It gets the
/// schedule, clipping, logging, checkpoints and resume of the others for free.
#[test]
fn a_third_trainer_is_one_objective() {
    use candle_core::{Tensor, Var, D};
    use peft_prelude::model::Forward;
    use peft_prelude::peft::PeftModel;
    use peft_prelude::train::{Objective, StepResult, Trainer};

    struct SayFortyTwo {
        prompts: Vec<Vec<u32>>,
    }
    impl Objective for SayFortyTwo {
        fn units(&self) -> usize {
            self.prompts.len()
        }
        fn step(
            &mut self,
            model: &PeftModel,
            micro_batches: &[Vec<usize>],
            params: &[Var],
            _args: &TrainingArgs,
        ) -> peft_prelude::Result<StepResult> {
            let mut out = StepResult {
                grads: vec![None; params.len()],
                ..Default::default()
            };
            for picked in micro_batches {
                for &i in picked {
                    let ids =
                        Tensor::new(self.prompts[i].as_slice(), model.device())?.unsqueeze(0)?;
                    let logits = model.last_logits(Forward::ids(&ids))?;
                    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                    let loss = (lp.narrow(1, 42, 1)?.sum_all()? * -1.0)?;
                    out.loss += loss.to_scalar::<f32>()? as f64 / micro_batches.len() as f64;
                    peft_prelude::grads::accumulate(&mut out.grads, params, &loss.backward()?)?;
                    out.samples += 1;
                    out.tokens += self.prompts[i].len();
                }
            }
            Ok(out)
        }
    }

    let out = scratch("third");
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let peft = get_peft_model(p.model, LoraConfig::all_projections(4, 8.0)).unwrap();
    let args = TrainingArgs {
        output_dir: out.clone(),
        per_device_train_batch_size: 2,
        learning_rate: 5e-3,
        max_steps: 6,
        warmup_steps: 0,
        save_steps: Some(3),
        ..Default::default()
    };
    let objective = SayFortyTwo {
        prompts: vec![
            vec![1, 415, 2936],
            vec![1, 5713, 3714],
            vec![1, 22557, 1526],
        ],
    };
    let mut trainer = Trainer::with_objective(peft, p.tokenizer, args, objective).unwrap();
    let result = trainer.train().unwrap();
    assert_eq!(result.global_step, 6);
    let losses: Vec<f64> = trainer.history().entries.iter().map(|e| e.loss).collect();
    assert!(
        losses[5] < losses[0] / 2.0,
        "the objective's loss does not fall: {losses:?}"
    );
    for step in [3, 6] {
        assert!(
            out.join(format!("checkpoint-{step}/adapter_model.safetensors"))
                .is_file(),
            "checkpoint {step}"
        );
    }
    let _ = std::fs::remove_dir_all(out);
}
