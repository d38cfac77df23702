//! The f32 matmul throughput the training step gets (candle's CPU matmul, i.e. gemm's
//! kernels), at the shapes `../shared/bench/cpu_roofline.py` times with PyTorch's BLAS, so the
//! two JSON lines compare key by key: `sgemm_gflops_MxKxN` for `a [M, K] · wᵀ` with
//! `w [N, K]` (the forward of a projection), plus the two products of its backward
//! (`dy · w`: `dx_gflops_..`; the LoRA-free base has no `dW`).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p peft-kernels --example bench_matmul
//! ```

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use peft_kernels::q8_gemm;

fn median_secs(mut f: impl FnMut() -> Result<()>, reps: usize) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let mut line = serde_like_json::Object::default();
    line.push("threads", candle_core::utils::get_num_threads().to_string());
    for (m, k, n) in [
        (1024, 576, 576),
        (1024, 576, 1536),
        (1024, 1536, 576),
        (1024, 576, 49152),
        (2048, 2048, 2048),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let dy = Tensor::randn(0f32, 1., (m, n), &dev)?;
        let flops = 2.0 * (m * k * n) as f64;
        let reps = if n >= 49152 || m >= 2048 { 5 } else { 15 };
        let fwd = median_secs(|| a.matmul(&w.t()?).map(drop), reps)?;
        let dx = median_secs(|| dy.matmul(&w).map(drop), reps)?;
        line.push(
            &format!("sgemm_gflops_{m}x{k}x{n}"),
            format!("{:.1}", flops / fwd / 1e9),
        );
        line.push(
            &format!("dx_gflops_{m}x{k}x{n}"),
            format!("{:.1}", flops / dx / 1e9),
        );
        // The integer GEMM of a quantized base (8-bit blocks; AVX512-VNNI and AVX-VNNI where
        // the CPU has them), including the rounding of the activations to 8 bits.
        if k % q8_gemm::BLOCK == 0 && n % q8_gemm::BLOCK == 0 {
            let av = a.flatten_all()?.to_vec1::<f32>()?;
            let dyv = dy.flatten_all()?.to_vec1::<f32>()?;
            let wv = w.flatten_all()?.to_vec1::<f32>()?;
            let wq = q8_gemm::Q8Matrix::quantize(&wv, n, k).map_err(candle_core::Error::msg)?;
            let wt = q8_gemm::Q8Matrix::quantize_transposed(&wv, n, k)
                .map_err(candle_core::Error::msg)?;
            // Every integer implementation this CPU has (the scalar reference is too slow to
            // time at these shapes).
            for isa in q8_gemm::Isa::supported() {
                if isa == q8_gemm::Isa::Generic {
                    continue;
                }
                let q8 = |x: &[f32], w: &q8_gemm::Q8Matrix| {
                    q8_gemm::matmul_t_with(isa, x, m, w)
                        .map(drop)
                        .map_err(candle_core::Error::msg)
                };
                let fwd = median_secs(|| q8(&av, &wq), reps)?;
                let dx = median_secs(|| q8(&dyv, &wt), reps)?;
                let name = format!("{isa:?}").to_lowercase();
                line.push(
                    &format!("q8_{name}_gops_{m}x{k}x{n}"),
                    format!("{:.1}", flops / fwd / 1e9),
                );
                line.push(
                    &format!("q8_{name}_dx_gops_{m}x{k}x{n}"),
                    format!("{:.1}", flops / dx / 1e9),
                );
            }
        }
    }
    println!("{}", line.render());
    Ok(())
}

/// A flat JSON object of numbers (no serde in this crate's dependencies).
mod serde_like_json {
    #[derive(Default)]
    pub struct Object(Vec<(String, String)>);

    impl Object {
        pub fn push(&mut self, key: &str, number: String) {
            self.0.push((key.to_string(), number));
        }

        pub fn render(&self) -> String {
            let fields: Vec<String> = self
                .0
                .iter()
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}
