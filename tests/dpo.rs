//! DPO losses and metrics against TRL, and a short DPO run that learns its preferences.

use candle_core::{Device, Tensor};
use peft_prelude::data::Dataset;
use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig};
use peft_prelude::train::{dpo_loss, DpoConfig, DpoLossType, DpoTrainer, PairLogps, TrainingArgs};
use peft_tests::{fixture, json_fixture};

fn vec_f32(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn losses_and_metrics_match_trl() {
    let f = json_fixture("dpo/dpo.json");
    let b = &f["batch"];
    let t = |k: &str| Tensor::new(vec_f32(&b[k]).as_slice(), &Device::Cpu).unwrap();
    let counts = |k: &str| -> Vec<usize> {
        b[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    let (pc, pr, rc, rr) = (
        t("policy_chosen_logps"),
        t("policy_rejected_logps"),
        t("reference_chosen_logps"),
        t("reference_rejected_logps"),
    );
    let (cc, rcn) = (
        counts("chosen_completion_lengths"),
        counts("rejected_completion_lengths"),
    );
    let logps = PairLogps {
        policy_chosen: &pc,
        policy_rejected: &pr,
        reference_chosen: &rc,
        reference_rejected: &rr,
        chosen_tokens: &cc,
        rejected_tokens: &rcn,
    };
    let results = f["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for r in results {
        let loss_type = match r["loss_type"].as_str().unwrap() {
            "sigmoid" => DpoLossType::Sigmoid,
            "ipo" => DpoLossType::Ipo,
            "hinge" => DpoLossType::Hinge,
            "robust" => DpoLossType::Robust,
            other => panic!("{other}"),
        };
        let config = DpoConfig {
            beta: r["beta"].as_f64().unwrap(),
            loss_type,
            label_smoothing: r["label_smoothing"].as_f64().unwrap(),
            ..Default::default()
        };
        let (loss, m) = dpo_loss(&logps, &config).unwrap();
        let close = |a: f64, b: f64, what: &str| {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
                "{loss_type:?}/{what}: {a} vs {b}"
            );
        };
        close(
            loss.to_scalar::<f32>().unwrap() as f64,
            r["loss"].as_f64().unwrap(),
            "loss",
        );
        let want = &r["metrics"];
        close(
            m.rewards_chosen,
            want["rewards/chosen"].as_f64().unwrap(),
            "rewards/chosen",
        );
        close(
            m.rewards_rejected,
            want["rewards/rejected"].as_f64().unwrap(),
            "rewards/rejected",
        );
        close(
            m.rewards_accuracies,
            want["rewards/accuracies"].as_f64().unwrap(),
            "rewards/accuracies",
        );
        close(
            m.rewards_margins,
            want["rewards/margins"].as_f64().unwrap(),
            "rewards/margins",
        );
        close(
            m.logps_chosen,
            want["logps/chosen"].as_f64().unwrap(),
            "logps/chosen",
        );
        close(
            m.logps_rejected,
            want["logps/rejected"].as_f64().unwrap(),
            "logps/rejected",
        );
    }
}

#[test]
fn a_short_dpo_run_prefers_the_chosen_answers() {
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let rows: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Review number {i} says the food was"),
                "chosen": " good",
                "rejected": " bad",
            })
        })
        .collect();
    let data = Dataset::from_records(&rows).unwrap();
    let peft = get_peft_model(p.model, LoraConfig::all_projections(4, 8.0)).unwrap();
    let out = std::env::temp_dir().join(format!("peft-dpo-{}", std::process::id()));
    let args = TrainingArgs {
        output_dir: out.clone(),
        per_device_train_batch_size: 4,
        learning_rate: 5e-3,
        max_steps: 12,
        logging_steps: 4,
        ..Default::default()
    };
    for precompute in [false, true] {
        let config = DpoConfig {
            beta: 0.5,
            precompute_ref_log_probs: precompute,
            ..Default::default()
        };
        let peft = get_peft_model(
            Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default())
                .unwrap()
                .model,
            LoraConfig::all_projections(4, 8.0),
        )
        .unwrap();
        let mut trainer =
            DpoTrainer::new(peft, p.tokenizer.clone(), &data, args.clone(), config).unwrap();
        trainer.train().unwrap();
        let m = trainer.metrics();
        let (first, last) = (&m[0].1, &m[m.len() - 1].1);
        assert!(
            first.rewards_margins.abs() < 1e-6,
            "the reference equals the policy at the start"
        );
        assert!(
            last.rewards_margins > 0.5,
            "margin {} after training",
            last.rewards_margins
        );
        assert_eq!(last.rewards_accuracies, 1.0);
        assert!(last.loss < first.loss);
    }
    drop(peft);
    let _ = std::fs::remove_dir_all(out);
}
