//! Optimizer step time for SmolLM2-135M's LoRA parameters (r=16 on all seven projections of
//! 30 layers: 4.9M values), f32 and 8-bit moments, on the CPU. One JSON line per optimizer.
//!
//! ```text
//! cargo run --release -p peft_prelude --example bench_optim -- [STEPS]
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use peft_prelude::train::{AdamWConfig, Optimizer};

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let (hidden, kv, inter, r, layers) = (576, 192, 1536, 16, 30);
    let shapes = [
        (r, hidden),
        (hidden, r), // q: A, B
        (r, hidden),
        (kv, r), // k
        (r, hidden),
        (kv, r), // v
        (r, hidden),
        (hidden, r), // o
        (r, hidden),
        (inter, r), // gate
        (r, hidden),
        (inter, r), // up
        (r, inter),
        (hidden, r), // down
    ];
    let dev = Device::Cpu;
    let mut params = vec![];
    for l in 0..layers {
        for (i, &s) in shapes.iter().enumerate() {
            let v = Var::from_tensor(&Tensor::randn(0f32, 0.02, s, &dev)?)?;
            params.push((format!("l{l}.p{i}"), v));
        }
    }
    let values: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let grads: Vec<Option<Tensor>> = params
        .iter()
        .map(|(_, v)| Ok(Some(Tensor::randn(0f32, 1e-3, v.shape(), &dev)?)))
        .collect::<anyhow::Result<_>>()?;
    for kind in ["adamw_torch", "adamw_8bit"] {
        let mut opt = Optimizer::new(
            kind,
            params.clone(),
            AdamWConfig {
                lr: 2e-4,
                ..Default::default()
            },
        )?;
        opt.step(&grads)?; // warm-up
        let mut times = vec![];
        for _ in 0..steps {
            let t = Instant::now();
            opt.step(&grads)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({
                "bench": "optimizer_step",
                "optim": kind,
                "values": values,
                "threads": rayon::current_num_threads(),
                "step_ms_median": times[times.len() / 2] * 1e3,
            })
        );
    }
    Ok(())
}
