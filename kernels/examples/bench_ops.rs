//! Times each fused op against the plain candle composition it replaces (forward + backward),
//! at SmolLM2-135M shapes (hidden 576, intermediate 1536, 9 heads / 3 kv heads × 64,
//! vocab 49152, 4 × 256 tokens), on the CPU in f32. One JSON line per op.
//!
//! ```text
//! cargo run --release -p peft-kernels --example bench_ops [-- --iters N]
//! ```

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var, D};
use peft_kernels::frozen::{frozen_linear, mul_const};

const B: usize = 4;
const T: usize = 256;
const HIDDEN: usize = 576;
const INTER: usize = 1536;
const HEADS: usize = 9;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 49152;
const RANK: usize = 16;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10usize);
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();

    // RMSNorm over [4, 256, 576].
    let x = Var::randn(0f32, 1., (B, T, HIDDEN), &dev)?;
    let w = Tensor::randn(1f32, 0.1, HIDDEN, &dev)?;
    report(
        "rms_norm",
        "[4,256,576]",
        iters,
        threads,
        || peft_kernels::rms_norm(&x, &w, 1e-5),
        || {
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
                .sqrt()?
                .recip()?;
            mul_const(&x.broadcast_mul(&r)?, &w)
        },
    )?;

    // RoPE on q as the projection produces it: [4, 256, 9, 64] viewed as [4, 9, 256, 64].
    let q = Var::randn(0f32, 1., (B, T, HEADS, HEAD_DIM), &dev)?;
    let ang = Tensor::randn(0f32, 1., (B, 1, T, HEAD_DIM), &dev)?;
    let (cos, sin) = (ang.cos()?, ang.sin()?);
    report(
        "rope",
        "q [4,9,256,64]",
        iters,
        threads,
        || peft_kernels::rope(&q.transpose(1, 2)?, &cos, &sin),
        || {
            let x = q.transpose(1, 2)?.contiguous()?;
            let half = HEAD_DIM / 2;
            let rot = Tensor::cat(
                &[
                    &x.narrow(D::Minus1, half, half)?.neg()?,
                    &x.narrow(D::Minus1, 0, half)?,
                ],
                D::Minus1,
            )?;
            mul_const(&x, &cos)? + mul_const(&rot, &sin)?
        },
    )?;

    // SwiGLU on [4, 256, 1536].
    let g = Var::randn(0f32, 1., (B, T, INTER), &dev)?;
    let u = Var::randn(0f32, 1., (B, T, INTER), &dev)?;
    report(
        "swiglu",
        "[4,256,1536]",
        iters,
        threads,
        || peft_kernels::swiglu(&g, &u),
        || g.silu()? * u.as_tensor(),
    )?;

    // LoRA linear, the MLP's gate projection: x [1024, 576] → [1024, 1536], r = 16.
    let xl = Var::randn(0f32, 1., (B * T, HIDDEN), &dev)?;
    let wl = Tensor::randn(0f32, 0.02, (INTER, HIDDEN), &dev)?;
    let a = Var::randn(0f32, 0.02, (RANK, HIDDEN), &dev)?;
    let bm = Var::randn(0f32, 0.02, (INTER, RANK), &dev)?;
    report(
        "lora_linear",
        "x [1024,576] W [1536,576] r 16",
        iters,
        threads,
        || peft_kernels::lora_linear(&xl, &wl, &a, &bm, 2.0),
        || {
            let base = frozen_linear(&xl, &wl)?;
            let lora = xl.matmul(&a.t()?)?.matmul(&bm.t()?)?;
            base + (lora * 2.0)?
        },
    )?;

    // Cross-entropy over the 49152-token vocabulary from hidden states (tied head).
    let h = Var::randn(0f32, 1., (B * T, HIDDEN), &dev)?;
    let head = Tensor::randn(0f32, 0.05, (VOCAB, HIDDEN), &dev)?;
    let labels: Vec<i64> = (0..B * T)
        .map(|i| {
            if i % 8 == 0 {
                -100
            } else {
                (i * 7919 % VOCAB) as i64
            }
        })
        .collect();
    let lt = Tensor::new(labels.as_slice(), &dev)?;
    let ce_iters = iters.div_ceil(3).max(2);
    report(
        "cross_entropy",
        "h [1024,576] head [49152,576], 1/8 ignored",
        ce_iters,
        threads,
        || {
            let (loss, _) = peft_kernels::fused_linear_cross_entropy(
                &h,
                &head,
                &lt,
                peft_kernels::cross_entropy::DEFAULT_CHUNK,
            )?;
            Ok(loss)
        },
        || {
            // What peft_prelude's causal_lm_loss does with full logits.
            let logits = frozen_linear(&h, &head)?;
            let lsm = log_softmax(&logits)?;
            let (idx, wt): (Vec<u32>, Vec<f32>) = labels
                .iter()
                .map(|&y| if y < 0 { (0, 0.) } else { (y as u32, 1.) })
                .unzip();
            let count = wt.iter().sum::<f32>() as f64;
            let idx = Tensor::from_vec(idx, (B * T, 1), &dev)?;
            let wt = Tensor::from_vec(wt, B * T, &dev)?;
            let picked = lsm.gather(&idx, 1)?.squeeze(1)?;
            mul_const(&picked, &wt)?.sum_all()? / -count
        },
    )?;

    // Causal attention as the decoder calls it: 3 kv heads × 3 query groups, 4 × 256 tokens.
    let kv = HEADS / 3;
    let q = Var::randn(0f32, 1., (B, kv, 3 * T, HEAD_DIM), &dev)?;
    let k = Var::randn(0f32, 1., (B, kv, T, HEAD_DIM), &dev)?;
    let v = Var::randn(0f32, 1., (B, kv, T, HEAD_DIM), &dev)?;
    let causal: Vec<f32> = (0..T * T)
        .map(|i| if i % T > i / T { f32::MIN } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(causal, (1, 1, T, T), &dev)?;
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    report(
        "attention",
        "q [4,3,3x256,64], causal",
        iters,
        threads,
        || peft_kernels::attention::attention(&q, &k, &v, Some(&mask), 3, scale),
        || {
            let scores = (q.matmul(&k.t()?)? * scale)?
                .reshape((B, kv, 3, T, T))?
                .broadcast_add(&mask.unsqueeze(1)?)?
                .reshape((B, kv, 3 * T, T))?;
            let probs = log_softmax(&scores)?.exp()?;
            probs
                .matmul(&v)?
                .reshape((B, HEADS, T, HEAD_DIM))?
                .transpose(1, 2)?
                .reshape((B, T, HEADS * HEAD_DIM))
        },
    )?;
    Ok(())
}

/// `log_softmax` over the last dim as candle-nn computes it (differentiable composition).
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Backpropagates a fixed dense incoming gradient `c` into `y`, as a model's next layer would
/// (`sum(y ⊙ c)` would time candle's slow broadcast path of `sum_all`'s backward instead).
fn backward(y: &Tensor, c: &Tensor) -> Result<()> {
    let c = c.clone();
    let probe = Tensor::zeros((), y.dtype(), y.device())?;
    peft_kernels::frozen::reattach(y, probe, move |_| Ok(c.clone()))?
        .backward()
        .map(|_| ())
}

/// Median wall time of `f` in ms, after one warm-up call.
fn time(iters: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    f()?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[ms.len() / 2])
}

fn report(
    op: &str,
    shape: &str,
    iters: usize,
    threads: usize,
    fused: impl Fn() -> Result<Tensor>,
    unfused: impl Fn() -> Result<Tensor>,
) -> Result<()> {
    let ff = time(iters, &|| fused().map(|_| ()))?;
    let uf = time(iters, &|| unfused().map(|_| ()))?;
    let c = Tensor::randn(0f32, 1., fused()?.shape(), &Device::Cpu)?;
    let f = time(iters, &|| backward(&fused()?, &c))?;
    let u = time(iters, &|| backward(&unfused()?, &c))?;
    println!(
        "{{\"op\":\"{op}\",\"shape\":\"{shape}\",\"dtype\":\"f32\",\"threads\":{threads},\"iters\":{iters},\"fused_fwd_ms\":{ff:.2},\"unfused_fwd_ms\":{uf:.2},\"fused_fwd_bwd_ms\":{f:.2},\"unfused_fwd_bwd_ms\":{u:.2},\"speedup_fwd_bwd\":{:.2}}}",
        u / f
    );
    Ok(())
}
