//! Every CUDA kernel, run on CPU threads through the emulation with the launch geometry the CUDA
//! launchers use (`peft_kernels::launch`), against the CPU ops of `peft-kernels` (whose own
//! tests hold them to plain candle compositions) or, for the pieces no CPU op exposes alone,
//! against the formula computed here in f64.

use candle_core::{DType, Device, Result, Tensor, Var};
use peft_cuda_emu::{bf16, f16, launch, Elem, Shared};
use peft_kernels::launch::{elementwise, one_block_per_row, Geometry};
use peft_kernels::nf4::{Absmax, Nf4Matrix, NF4_CODE};

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.unit()).collect()
    }
}

fn run(g: Geometry, kernel: impl Fn() + Sync) {
    launch(g.grid, g.block, kernel).expect("a geometry a GPU accepts");
}

/// `v` rounded to `T` (the kernel's input) and back (the reference's input, the same numbers).
fn rounded<T: Elem>(v: &[f32]) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    let f = t.iter().map(|&x| x.to_f32()).collect();
    (t, f)
}

fn widen<T: Elem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|&x| x.to_f32()).collect()
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `|got - want| <= atol + rtol |want|` everywhere, reporting the worst element.
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        assert!(!g.is_nan() || w.is_nan(), "{what}: NaN at {i} (want {w})");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{what}: element {i} is {} against {} (rtol {rtol}, atol {atol})",
        got[i],
        want[i]
    );
}

/// Tolerance of one rounding to `T` of values around 1 (f32: the reductions' order).
fn tol<T: Elem>() -> f32 {
    match std::mem::size_of::<T>() {
        4 => 2e-5,
        _ if T::from_f32(1.0 + 1.0 / 512.0).to_f32() > 1.0 => 2e-3, // f16: 10 mantissa bits
        _ => 8e-3,                                                  // bf16: 7 mantissa bits
    }
}

// ---- RMSNorm ---------------------------------------------------------------------------------

fn rms_norm_case<T: Elem>(rows: usize, d: usize, seed: u64) -> Result<()> {
    let mut rng = Rng(seed);
    let eps = 1e-5f32;
    let (x, xf) = rounded::<T>(&rng.values(rows * d, 2.0));
    let (w, wf) = rounded::<T>(&rng.values(d, 1.0));
    let (dy, dyf) = rounded::<T>(&rng.values(rows * d, 1.0));
    let g = one_block_per_row(rows, d);

    let mut y = vec![T::from_f32(0.0); rows * d];
    let (px, pw, py) = (Shared::of(&x), Shared::of(&w), Shared::of_mut(&mut y));
    run(g, || unsafe {
        (T::KERNELS.rms_norm_fwd)(px.get(), pw.get(), py.get(), d as u32, eps)
    });
    let mut dx = vec![T::from_f32(0.0); rows * d];
    let (pdy, pdx) = (Shared::of(&dy), Shared::of_mut(&mut dx));
    run(g, || unsafe {
        (T::KERNELS.rms_norm_bwd)(px.get(), pw.get(), pdy.get(), pdx.get(), d as u32, eps)
    });

    let xv = Var::from_tensor(&tensor(&xf, &[rows, d]))?;
    let want = peft_kernels::rms_norm(xv.as_tensor(), &tensor(&wf, &[d]), eps as f64)?;
    let grads = (&want * tensor(&dyf, &[rows, d]))?.sum_all()?.backward()?;
    let want_dx = grads.get(xv.as_tensor()).expect("x gets a gradient");
    let what = format!("rms_norm {rows}x{d} {}", std::any::type_name::<T>());
    assert_close(
        &format!("{what} y"),
        &widen(&y),
        &host(&want),
        tol::<T>(),
        tol::<T>(),
    );
    assert_close(
        &format!("{what} dx"),
        &widen(&dx),
        &host(want_dx),
        tol::<T>(),
        tol::<T>(),
    );
    Ok(())
}

#[test]
fn rms_norm_forward_and_backward_match_the_cpu_op() -> Result<()> {
    // Rows shorter than a warp, not a multiple of 32, and longer than a 1024-thread block.
    for (i, d) in [1, 20, 64, 576, 1000, 3000].into_iter().enumerate() {
        rms_norm_case::<f32>(3, d, 11 + i as u64)?;
        rms_norm_case::<bf16>(3, d, 21 + i as u64)?;
        rms_norm_case::<f16>(2, d, 31 + i as u64)?;
    }
    Ok(())
}

// ---- RoPE ------------------------------------------------------------------------------------

/// x stored as `[b, t, h, d]` after `pad` unrelated elements and read as `[b, h, t, d]` through
/// strides (as attention hands it over); tables shared or one per batch entry.
fn rope_case<T: Elem>(
    (b, h, t, d): (usize, usize, usize, usize),
    per_batch: bool,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng(seed);
    let pad = 5;
    let (x, xf) = rounded::<T>(&rng.values(pad + b * t * h * d, 1.5));
    let tb = if per_batch { b } else { 1 };
    let angles: Vec<f32> = (0..tb * t * d)
        .map(|i| (i / d % t) as f32 * 0.37 + (i % (d / 2)) as f32 * 0.11 + (i / (t * d)) as f32)
        .collect();
    let (cos, cosf) = rounded::<T>(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>());
    let (sin, sinf) = rounded::<T>(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>());
    let (dy, dyf) = rounded::<T>(&rng.values(b * h * t * d, 1.0));
    let n = b * h * t * d;
    let g = elementwise(n / 2);
    let (pc, ps) = (Shared::of(&cos), Shared::of(&sin));
    let rotate = |input: Shared<T>, strides: [u64; 3], transpose: u32| {
        let mut y = vec![T::from_f32(0.0); n];
        let py = Shared::of_mut(&mut y);
        run(g, || unsafe {
            (T::KERNELS.rope)(
                input.get(),
                pc.get(),
                ps.get(),
                py.get(),
                b as u32,
                h as u32,
                t as u32,
                d as u32,
                strides[0],
                strides[1],
                strides[2],
                per_batch as u32,
                transpose,
            )
        });
        widen(&y)
    };
    let y = rotate(
        Shared(Shared::of(&x).get().wrapping_add(pad)),
        [(t * h * d) as u64, d as u64, (h * d) as u64],
        0,
    );
    let dx = rotate(
        Shared::of(&dy),
        [(h * t * d) as u64, (t * d) as u64, d as u64],
        1,
    );

    let table_shape: &[usize] = if per_batch { &[b, 1, t, d] } else { &[t, d] };
    let (cos_t, sin_t) = (tensor(&cosf, table_shape), tensor(&sinf, table_shape));
    let x_bhtd = tensor(&xf[pad..], &[b, t, h, d]).transpose(1, 2)?;
    let want = peft_kernels::rope(&x_bhtd, &cos_t, &sin_t)?;
    let xv = Var::from_tensor(&x_bhtd.contiguous()?)?;
    let yv = peft_kernels::rope(xv.as_tensor(), &cos_t, &sin_t)?;
    let grads = (yv * tensor(&dyf, &[b, h, t, d]))?.sum_all()?.backward()?;
    let want_dx = grads.get(xv.as_tensor()).expect("x gets a gradient");
    let what = format!(
        "rope {b}x{h}x{t}x{d} per_batch={per_batch} {}",
        std::any::type_name::<T>()
    );
    assert_close(
        &format!("{what} y"),
        &y,
        &host(&want),
        tol::<T>(),
        tol::<T>(),
    );
    assert_close(
        &format!("{what} dx"),
        &dx,
        &host(want_dx),
        tol::<T>(),
        tol::<T>(),
    );
    Ok(())
}

#[test]
fn rope_forward_and_transpose_match_the_cpu_op_on_strided_input() -> Result<()> {
    rope_case::<f32>((2, 3, 5, 8), false, 1)?;
    rope_case::<f32>((2, 3, 5, 8), true, 2)?;
    rope_case::<f32>((1, 4, 33, 64), false, 3)?;
    rope_case::<bf16>((3, 2, 7, 16), true, 4)?;
    rope_case::<f16>((2, 2, 9, 32), false, 5)?;
    Ok(())
}

// ---- SwiGLU ----------------------------------------------------------------------------------

fn swiglu_case<T: Elem>(n: usize, seed: u64) -> Result<()> {
    let mut rng = Rng(seed);
    let (g, gf) = rounded::<T>(&rng.values(n, 6.0));
    let (u, uf) = rounded::<T>(&rng.values(n, 2.0));
    let (dh, dhf) = rounded::<T>(&rng.values(n, 1.0));
    let geometry = elementwise(n);
    let mut h = vec![T::from_f32(0.0); n];
    let mut both = vec![T::from_f32(0.0); 2 * n];
    let (pg, pu, pdh) = (Shared::of(&g), Shared::of(&u), Shared::of(&dh));
    let (ph, pboth) = (Shared::of_mut(&mut h), Shared::of_mut(&mut both));
    run(geometry, || unsafe {
        (T::KERNELS.swiglu_fwd)(pg.get(), pu.get(), ph.get(), n as u64)
    });
    run(geometry, || unsafe {
        (T::KERNELS.swiglu_bwd)(pg.get(), pu.get(), pdh.get(), pboth.get(), n as u64)
    });

    let (gv, uv) = (
        Var::from_tensor(&tensor(&gf, &[n]))?,
        Var::from_tensor(&tensor(&uf, &[n]))?,
    );
    let want = peft_kernels::swiglu(gv.as_tensor(), uv.as_tensor())?;
    let grads = (&want * tensor(&dhf, &[n]))?.sum_all()?.backward()?;
    let what = format!("swiglu n={n} {}", std::any::type_name::<T>());
    let both = widen(&both);
    // __expf is expf here: the tolerance is the CPU op's own exp approximation and rounding.
    let (rt, at) = (tol::<T>().max(1e-5), tol::<T>().max(1e-6));
    assert_close(&format!("{what} h"), &widen(&h), &host(&want), rt, at);
    assert_close(
        &format!("{what} d_gate"),
        &both[..n],
        &host(grads.get(&gv).unwrap()),
        rt,
        at,
    );
    assert_close(
        &format!("{what} d_up"),
        &both[n..],
        &host(grads.get(&uv).unwrap()),
        rt,
        at,
    );
    Ok(())
}

#[test]
fn swiglu_forward_and_backward_match_the_cpu_op() -> Result<()> {
    swiglu_case::<f32>(1, 1)?;
    swiglu_case::<f32>(5000, 2)?;
    swiglu_case::<bf16>(777, 3)?;
    swiglu_case::<f16>(300, 4)?;
    Ok(())
}

// ---- LoRA's rank-r add -----------------------------------------------------------------------

/// `y += scale · xa · M` with `M[k, o]` read at `k·sk + o·so`: B stored `[n, r]` (the forward's
/// Bᵀ, sk = 1, so = r) and A stored `[r, n]` (the backward's dx, sk = n, so = 1).
fn add_low_rank_case<T: Elem>((m, n, r): (usize, usize, usize), transposed: bool, seed: u64) {
    let mut rng = Rng(seed);
    let (y0, y0f) = rounded::<T>(&rng.values(m * n, 1.0));
    let (xa, xaf) = rounded::<T>(&rng.values(m * r, 1.0));
    let (mat, matf) = rounded::<T>(&rng.values(r * n, 1.0));
    let (sk, so) = if transposed { (1, r) } else { (n, 1) };
    let scale = 0.75f32;
    let mut y = y0.clone();
    let (py, pxa, pm) = (Shared::of_mut(&mut y), Shared::of(&xa), Shared::of(&mat));
    run(elementwise(m * n), || unsafe {
        (T::KERNELS.add_low_rank)(
            py.get(),
            pxa.get(),
            pm.get(),
            m as u32,
            n as u32,
            r as u32,
            sk as u64,
            so as u64,
            scale,
        )
    });
    let want: Vec<f32> = (0..m * n)
        .map(|idx| {
            let (i, o) = (idx / n, idx % n);
            let dot: f64 = (0..r)
                .map(|k| xaf[i * r + k] as f64 * matf[k * sk + o * so] as f64)
                .sum();
            (y0f[idx] as f64 + scale as f64 * dot) as f32
        })
        .collect();
    let what = format!(
        "add_low_rank {m}x{n} r={r} transposed={transposed} {}",
        std::any::type_name::<T>()
    );
    assert_close(&what, &widen(&y), &want, tol::<T>(), tol::<T>() * r as f32);
}

#[test]
fn add_low_rank_matches_the_product_for_both_adapter_layouts() {
    for transposed in [false, true] {
        add_low_rank_case::<f32>((7, 300, 16), transposed, 1);
        add_low_rank_case::<f32>((1, 1, 1), transposed, 2);
        add_low_rank_case::<bf16>((5, 70, 8), transposed, 3);
        add_low_rank_case::<f16>((3, 40, 4), transposed, 4);
    }
}

// ---- Chunked cross-entropy -------------------------------------------------------------------

/// Runs the two cross-entropy kernels chunk by chunk as `fused_linear_cross_entropy` drives them
/// on CUDA; checks each chunk's shifted exponentials and the final per-row loss
/// `m + ln s − logit[target]` against log-softmax in f64.
fn cross_entropy_case<T: Elem>(n: usize, vocab: usize, chunk: usize, seed: u64) {
    let mut rng = Rng(seed);
    let (logits, lf) = rounded::<T>(&rng.values(n * vocab, 8.0));
    let targets: Vec<u32> = (0..n).map(|_| (rng.next() % vocab as u64) as u32).collect();
    let mut state: Vec<f32> = (0..n)
        .flat_map(|_| [f32::NEG_INFINITY, 0.0, 0.0, 0.0])
        .collect();
    let what = format!(
        "cross_entropy n={n} vocab={vocab} chunk={chunk} {}",
        std::any::type_name::<T>()
    );
    for v0 in (0..vocab).step_by(chunk) {
        let c = chunk.min(vocab - v0);
        let mut block: Vec<T> = (0..n)
            .flat_map(|i| logits[i * vocab + v0..i * vocab + v0 + c].to_vec())
            .collect();
        let mut next = vec![0f32; n * 4];
        let (pl, pt, ps, pn) = (
            Shared::of(&block),
            Shared::of(&targets),
            Shared::of(&state),
            Shared::of_mut(&mut next),
        );
        run(one_block_per_row(n, c), || unsafe {
            (T::KERNELS.ce_chunk_stats)(pl.get(), pt.get(), ps.get(), pn.get(), c as u32, v0 as u32)
        });
        state = next;
        let (pb, ps) = (Shared::of_mut(&mut block), Shared::of(&state));
        run(elementwise(n * c), || unsafe {
            (T::KERNELS.ce_exp_shifted)(pb.get(), ps.get(), n as u32, c as u32)
        });
        let want: Vec<f32> = (0..n * c)
            .map(|k| {
                ((lf[k / c * vocab + v0 + k % c] as f64 - state[k / c * 4] as f64).exp()) as f32
            })
            .collect();
        assert_close(
            &format!("{what} exp chunk {v0}"),
            &widen(&block),
            &want,
            tol::<T>(),
            1e-6,
        );
    }
    let got: Vec<f32> = (0..n)
        .map(|i| state[i * 4] + state[i * 4 + 1].ln() - state[i * 4 + 2])
        .collect();
    let want: Vec<f32> = (0..n)
        .map(|i| {
            let row = &lf[i * vocab..(i + 1) * vocab];
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let lse = m + row.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
            (lse - row[targets[i] as usize] as f64) as f32
        })
        .collect();
    assert_close(&format!("{what} loss"), &got, &want, 1e-5, 1e-5);
}

#[test]
fn chunked_cross_entropy_kernels_give_the_log_softmax_loss() {
    cross_entropy_case::<f32>(4, 1000, 384, 1);
    cross_entropy_case::<f32>(3, 5000, 5000, 2); // one chunk, rows longer than a block
    cross_entropy_case::<f32>(2, 70, 1, 3); // chunks of one column
    cross_entropy_case::<bf16>(3, 900, 256, 4);
    cross_entropy_case::<f16>(2, 600, 200, 5);
}

// ---- NF4 dequantization ----------------------------------------------------------------------

fn nf4_case<T: Elem>(
    (rows, cols): (usize, usize),
    blocksize: usize,
    nested: bool,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng(seed);
    let n = rows * cols;
    let blocks = n.div_ceil(blocksize);
    let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.next() as u8).collect();
    let absmax = if nested {
        let nested_blocksize = 3;
        Absmax::Nested {
            codes: (0..blocks).map(|_| rng.next() as u8).collect(),
            code_map: rng.values(256, 1.0),
            nested_absmax: rng.values(blocks.div_ceil(nested_blocksize), 0.2),
            nested_blocksize,
            offset: 0.031,
        }
    } else {
        Absmax::Plain(
            rng.values(blocks, 0.5)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect(),
        )
    };
    let mut out = vec![T::from_f32(f32::NAN); n];
    let (pp, pc, po) = (
        Shared::of(&packed),
        Shared::of(&NF4_CODE),
        Shared::of_mut(&mut out),
    );
    let g = elementwise(n.div_ceil(2));
    match &absmax {
        Absmax::Plain(a) => {
            let pa = Shared::of(a);
            run(g, || unsafe {
                (T::KERNELS.nf4_dequant_plain)(
                    pp.get(),
                    pc.get(),
                    pa.get(),
                    blocksize as u32,
                    po.get(),
                    n as u64,
                )
            })
        }
        Absmax::Nested {
            codes,
            code_map,
            nested_absmax,
            nested_blocksize,
            offset,
        } => {
            let (pq, pm, pn) = (
                Shared::of(codes),
                Shared::of(code_map),
                Shared::of(nested_absmax),
            );
            run(g, || unsafe {
                (T::KERNELS.nf4_dequant_nested)(
                    pp.get(),
                    pc.get(),
                    pq.get(),
                    pm.get(),
                    pn.get(),
                    *nested_blocksize as u32,
                    *offset,
                    blocksize as u32,
                    po.get(),
                    n as u64,
                )
            })
        }
    }
    let dtype = match std::mem::size_of::<T>() {
        4 => DType::F32,
        _ if T::from_f32(1.0 + 1.0 / 512.0).to_f32() > 1.0 => DType::F16,
        _ => DType::BF16,
    };
    let matrix = Nf4Matrix::new(
        Tensor::from_vec(packed, n.div_ceil(2), &Device::Cpu)?,
        absmax,
        NF4_CODE,
        blocksize,
        rows,
        cols,
    )?;
    let want = host(&matrix.dequantize_to(dtype)?);
    let got = widen(&out);
    // The same f32 operations in the same order, rounded once: bit for bit.
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "nf4 {rows}x{cols} blocksize {blocksize} nested={nested} {dtype:?}: element {i}: {g} vs {w}"
        );
    }
    Ok(())
}

#[test]
fn nf4_dequantization_is_bit_exact_with_the_cpu() -> Result<()> {
    for nested in [false, true] {
        nf4_case::<f32>((7, 37), 64, nested, 1)?; // an odd element count: the last byte is half used
        nf4_case::<f32>((64, 300), 64, nested, 2)?;
        nf4_case::<bf16>((16, 96), 128, nested, 3)?;
        nf4_case::<f16>((5, 50), 32, nested, 4)?;
    }
    Ok(())
}

#[test]
fn a_geometry_a_gpu_refuses_is_refused() {
    assert!(launch(1, 1025, || ()).is_err());
    assert!(launch(0, 32, || ()).is_err());
    assert!(launch(1, 32, || ()).is_ok());
}

// ---- AdamW -----------------------------------------------------------------------------------

mod adamw_kernels {
    use super::*;
    use peft_cuda_emu::adamw as k;
    use peft_kernels::adamw::adamw8::{self, Layout8, BLOCK};
    use peft_kernels::adamw::{adamw_step, AdamWStep};

    fn step() -> AdamWStep {
        AdamWStep::new(2e-4, 0.9, 0.999, 1e-8, 0.01, 7)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// p, g, m, v with the spread a real step sees (v ≥ 0, some exact zeros in g as a frozen
    /// A's first step has).
    fn operands(n: usize, seed: u64) -> [Vec<f32>; 4] {
        let mut rng = Rng(seed);
        let p = rng.values(n, 0.5);
        let g: Vec<f32> = rng
            .values(n, 1e-2)
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 7 == 0 { 0.0 } else { x })
            .collect();
        let m = rng.values(n, 1e-3);
        let v = rng.values(n, 1e-2).iter().map(|x| x * x).collect();
        [p, g, m, v]
    }

    #[test]
    fn f32_adamw_kernels_are_bit_exact_with_the_cpu_op() -> Result<()> {
        for (n, seed) in [(1, 1), (1000, 2), (70_001, 3)] {
            let [p, g, m, v] = operands(n, seed);
            let s = step();
            let state: Vec<f32> = [m, v].concat();
            let mut new_state = vec![0f32; 2 * n];
            let mut new_p = vec![0f32; n];
            let (pp, pg, ps) = (Shared::of(&p), Shared::of(&g), Shared::of(&state));
            let (pns, pnp) = (Shared::of_mut(&mut new_state), Shared::of_mut(&mut new_p));
            let a = |f: &dyn Fn(f32, f32, f32, f32, f32, f32, f32)| {
                f(
                    s.decay,
                    s.one_minus_beta1,
                    s.beta2,
                    s.one_minus_beta2,
                    s.step_size,
                    s.bias_correction2_sqrt,
                    s.eps,
                )
            };
            run(elementwise(n), || {
                a(&|a0, a1, a2, a3, a4, a5, a6| unsafe {
                    k::adamw_moments_f32(
                        pg.get(),
                        ps.get(),
                        pns.get(),
                        n as u64,
                        a0,
                        a1,
                        a2,
                        a3,
                        a4,
                        a5,
                        a6,
                    )
                })
            });
            run(elementwise(n), || {
                a(&|a0, a1, a2, a3, a4, a5, a6| unsafe {
                    k::adamw_param_f32(
                        pp.get(),
                        pg.get(),
                        ps.get(),
                        pnp.get(),
                        n as u64,
                        a0,
                        a1,
                        a2,
                        a3,
                        a4,
                        a5,
                        a6,
                    )
                })
            });
            let dev = Device::Cpu;
            let (want_p, want_state) = adamw_step(
                &Tensor::from_slice(&p, n, &dev)?,
                &Tensor::from_slice(&g, n, &dev)?,
                &Tensor::from_slice(&state, (2, n), &dev)?,
                s,
            )?;
            assert_eq!(bits(&new_p), bits(&want_p.to_vec1()?), "p', n = {n}");
            assert_eq!(
                bits(&new_state),
                bits(&want_state.flatten_all()?.to_vec1()?),
                "m', v', n = {n}"
            );
        }
        Ok(())
    }

    #[test]
    fn eight_bit_adamw_kernels_are_bit_exact_with_the_cpu_op() -> Result<()> {
        // One partial block, several blocks with a partial last one, and codes padding (odd n).
        for (n, seed) in [(5, 1), (3 * BLOCK + 77, 2), (BLOCK, 3)] {
            let [p, g, m, v] = operands(n, seed);
            let s = step();
            let dev = Device::Cpu;
            let state = adamw8::encode(&m, &v, &dev)?;
            let state_bytes: Vec<u8> = state.to_vec1()?;
            let layout = Layout8::new(n);
            let mut new_state = vec![0u8; layout.bytes()];
            let mut new_p = vec![0f32; n];
            let (pp, pg, ps) = (Shared::of(&p), Shared::of(&g), Shared::of(&state_bytes));
            let (pns, pnp) = (Shared::of_mut(&mut new_state), Shared::of_mut(&mut new_p));
            let off = layout.scales_offset as u32;
            let g8 = one_block_per_row(layout.blocks, BLOCK);
            assert_eq!(g8.block as usize, BLOCK, "one thread per value of a block");
            run(g8, || unsafe {
                k::adamw8_moments(
                    pg.get(),
                    ps.get(),
                    pns.get(),
                    n as u64,
                    off,
                    s.decay,
                    s.one_minus_beta1,
                    s.beta2,
                    s.one_minus_beta2,
                    s.step_size,
                    s.bias_correction2_sqrt,
                    s.eps,
                )
            });
            run(elementwise(n), || unsafe {
                k::adamw8_param(
                    pp.get(),
                    pg.get(),
                    ps.get(),
                    pnp.get(),
                    n as u64,
                    off,
                    s.decay,
                    s.one_minus_beta1,
                    s.beta2,
                    s.one_minus_beta2,
                    s.step_size,
                    s.bias_correction2_sqrt,
                    s.eps,
                )
            });
            let (want_p, want_state) = adamw8::adamw8_step(
                &Tensor::from_slice(&p, n, &dev)?,
                &Tensor::from_slice(&g, n, &dev)?,
                &state,
                s,
            )?;
            assert_eq!(bits(&new_p), bits(&want_p.to_vec1()?), "p', n = {n}");
            assert_eq!(
                new_state,
                want_state.to_vec1::<u8>()?,
                "8-bit state, n = {n}"
            );
        }
        Ok(())
    }
}
