//! One frozen projection, forward + input-gradient backward, dense f32 vs NF4, alternating
//! runs and keeping the best of each (robust on a shared machine). One JSON line per shape.
//!
//! ```text
//! cargo run --release -p peft_prelude --example bench_qlora_layer -- [TOKENS] [REPS]
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use peft_prelude::model::{FrozenLinear, Linear};
use peft_prelude::quant::Nf4Weight;

fn step(layer: &FrozenLinear, x: &Var, c: &Tensor) -> anyhow::Result<f64> {
    let t = Instant::now();
    let y = layer.forward(x.as_tensor())?;
    let grads = (y * c)?.sum_all()?.backward()?;
    anyhow::ensure!(grads.get(x.as_tensor()).is_some());
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let reps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    for (out_f, in_f) in [(1536, 576), (576, 1536), (4096, 4096), (14336, 4096)] {
        let w = Tensor::randn(0f32, 0.02, (out_f, in_f), &Device::Cpu)?;
        let dense = FrozenLinear::new(w.clone(), None);
        let nf4 =
            FrozenLinear::quantized(std::sync::Arc::new(Nf4Weight::quantize(&w, true)?), None);
        drop(w);
        let x = Var::randn(0f32, 1.0, (tokens, in_f), &Device::Cpu)?;
        let c = Tensor::randn(0f32, 1.0, (tokens, out_f), &Device::Cpu)?;
        let (mut best_dense, mut best_nf4) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            best_dense = best_dense.min(step(&dense, &x, &c)?);
            best_nf4 = best_nf4.min(step(&nf4, &x, &c)?);
        }
        let flops = 4.0 * (tokens * out_f * in_f) as f64; // forward + dx
        println!(
            "{}",
            serde_json::json!({
                "shape": [out_f, in_f], "tokens": tokens,
                "dense_seconds": best_dense, "nf4_seconds": best_nf4,
                "dense_gflops": flops / best_dense / 1e9, "nf4_gflops": flops / best_nf4 / 1e9,
                "nf4_over_dense": best_nf4 / best_dense,
            })
        );
    }
    Ok(())
}
