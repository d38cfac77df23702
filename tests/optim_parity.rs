//! AdamW and the learning-rate schedules against torch / transformers.

use candle_core::{Tensor, Var};
use peft_prelude::train::{AdamW, AdamWConfig, Schedule, SchedulerType};
use peft_tests::{json_fixture, tensors};

#[test]
fn adamw_matches_torch_for_three_steps() {
    let f = tensors("optim/adamw.safetensors");
    let p0 = Var::from_tensor(&f["p0.init"]).unwrap();
    let p1 = Var::from_tensor(&f["p1.init"]).unwrap();
    let config = AdamWConfig {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = AdamW::new(
        vec![("p0".into(), p0.clone()), ("p1".into(), p1.clone())],
        config,
    )
    .unwrap();
    let mut worst = 0f32;
    for s in 1..=3 {
        let grads: Vec<Option<Tensor>> = (0..2)
            .map(|i| Some(f[&format!("step{s}.p{i}.grad")].clone()))
            .collect();
        opt.step(&grads).unwrap();
        for (i, p) in [&p0, &p1].iter().enumerate() {
            let want = &f[&format!("step{s}.p{i}.param")];
            let d = (p.as_tensor() - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            worst = worst.max(d);
            let m = &opt.state().unwrap()[i];
            for (ours, key) in [(&m.exp_avg, "exp_avg"), (&m.exp_avg_sq, "exp_avg_sq")] {
                let want = &f[&format!("step{s}.p{i}.{key}")];
                let d = (ours - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                worst = worst.max(d);
            }
        }
    }
    eprintln!("AdamW: max |diff| over params and moments: {worst:e}");
    assert_eq!(worst, 0.0, "bit-exact with torch");
}

#[test]
fn schedules_match_transformers() {
    let j = json_fixture("optim/schedules.json");
    let warmup = j["num_warmup_steps"].as_u64().unwrap() as usize;
    let total = j["num_training_steps"].as_u64().unwrap() as usize;
    let base = j["base_lr"].as_f64().unwrap();
    for (name, kind) in [
        ("linear", SchedulerType::Linear),
        ("cosine", SchedulerType::Cosine),
        ("constant_with_warmup", SchedulerType::ConstantWithWarmup),
    ] {
        let s = Schedule {
            kind,
            base_lr: base,
            warmup_steps: warmup,
            total_steps: total,
        };
        let want: Vec<f64> = j["schedules"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(want.len(), total + 1);
        for (k, w) in want.iter().enumerate() {
            let got = s.lr(k);
            assert!(
                (got - w).abs() <= 1e-12 * w.abs().max(1e-30),
                "{name}[{k}]: {got} vs {w}"
            );
        }
    }
}
