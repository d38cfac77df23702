//! Every fused op, forward and backward, against a reference:
//!
//! * on a GPU: the CUDA implementation in f32 and bf16 against the CPU implementation in f32;
//! * `--cpu`: the CPU implementation against the plain candle composition (what CI can run);
//! * `--dry-gpu`: the GPU comparison with the CPU standing in for the GPU.
//!
//! One JSON line per op and dtype: `{"op", "device", "dtype", "max_rel_err", "tol", "ok"}`.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use peft_prelude::quant::{Nf4Weight, QuantizedWeight};

/// How an input is prepared on the device under test.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// An activation: cast to the dtype under test, gets a gradient.
    Act,
    /// A constant activation-dtype operand (frozen weight, table): cast, no gradient.
    Const,
    /// An adapter weight: stays f32, gets a gradient.
    Adapter,
    /// Integer labels, or f32 data the op converts itself (an NF4 weight): unchanged.
    Labels,
}

type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

struct Case {
    name: &'static str,
    inputs: Vec<(Kind, Tensor)>,
    fused: Box<OpFn>,
    composition: Box<OpFn>,
}

/// Runs every case; returns the number of mismatches.
pub fn check_all(cpu_only: bool, dry_gpu: bool) -> Result<usize> {
    let dev = if cpu_only || dry_gpu {
        Device::Cpu
    } else {
        Device::new_cuda(0)?
    };
    let dtypes: &[DType] = if cpu_only {
        &[DType::F32, DType::F64]
    } else {
        &[DType::F32, DType::BF16]
    };
    let mut failures = 0;
    for case in cases()? {
        for &dtype in dtypes {
            if case.name == "nf4_linear" && dtype == DType::F64 {
                continue; // NF4 computes in f32
            }
            let (err, tol) = check(&case, &dev, dtype, cpu_only)?;
            let ok = err <= tol;
            failures += usize::from(!ok);
            println!(
                "{{\"op\":\"{}\",\"device\":\"{}\",\"dtype\":\"{dtype:?}\",\"max_rel_err\":{err:.3e},\"tol\":{tol:e},\"ok\":{ok}}}",
                case.name,
                if cpu_only || dry_gpu { "cpu" } else { "cuda" },
            );
        }
    }
    failures += nf4_dequantize_is_exact(&dev)?;
    failures += adamw_steps_are_exact(&dev)?;
    Ok(failures)
}

/// Three AdamW steps on the device, with f32 and with 8-bit moments, equal the host's bit for
/// bit: the plain fused loop (torch's arithmetic), for 8-bit moments run on the decoded stored
/// moments with the new ones stored again (so the CPU dry run checks the op too, not itself).
fn adamw_steps_are_exact(dev: &Device) -> Result<usize> {
    use peft_kernels::adamw::{adamw8, adamw_step, adamw_update, AdamWStep};
    let n = 3 * 256 + 77;
    let (p0, m0) = (randn(n, 0.5)?, randn(n, 1e-3)?);
    let v0 = randn(n, 1e-2)?.sqr()?;
    let mut failures = 0;
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    // f32 moments: device ops against the fused loop on the host.
    let (mut p, mut st) = (
        p0.to_device(dev)?,
        Tensor::stack(&[&m0, &v0], 0)?.to_device(dev)?,
    );
    let (mut hp, mut hm, mut hv) = (host(&p0)?, host(&m0)?, host(&v0)?);
    // 8-bit moments: device ops against the fused loop between a decode and an encode.
    let mut st8_host = adamw8::encode(&host(&m0)?, &host(&v0)?, &Device::Cpu)?;
    let (mut p8, mut st8) = (p0.to_device(dev)?, st8_host.to_device(dev)?);
    let mut p8_host = host(&p0)?;
    for t in 1..=3 {
        let s = AdamWStep::new(1e-3, 0.9, 0.999, 1e-8, 0.01, t);
        let g = randn(n, 1e-2)?;
        (p, st) = adamw_step(&p, &g.to_device(dev)?, &st, s)?;
        adamw_update(&mut hp, &host(&g)?, &mut hm, &mut hv, s);
        (p8, st8) = adamw8::adamw8_step(&p8, &g.to_device(dev)?, &st8, s)?;
        let (mut m8, mut v8) = adamw8::decode(&st8_host, n)?;
        adamw_update(&mut p8_host, &host(&g)?, &mut m8, &mut v8, s);
        st8_host = adamw8::encode(&m8, &v8, &Device::Cpu)?;
    }
    let f32_ok = bits(host(&p)?) == bits(hp)
        && bits(host(&st.get(0)?)?) == bits(hm)
        && bits(host(&st.get(1)?)?) == bits(hv);
    let st8_bytes = |t: &Tensor| t.to_device(&Device::Cpu)?.to_vec1::<u8>();
    let eight_ok = bits(host(&p8)?) == bits(p8_host) && st8_bytes(&st8)? == st8_bytes(&st8_host)?;
    for (what, ok) in [("adamw_step", f32_ok), ("adamw8_step", eight_ok)] {
        failures += usize::from(!ok);
        println!(
            "{{\"op\":\"{what}\",\"device\":\"{}\",\"steps\":3,\"bit_exact\":{ok},\"ok\":{ok}}}",
            if dev.is_cpu() { "cpu" } else { "cuda" }
        );
    }
    Ok(failures)
}

/// The device's NF4 dequantization in f32 equals the CPU's bit for bit (plain and
/// double-quantized scales).
fn nf4_dequantize_is_exact(dev: &Device) -> Result<usize> {
    let w = randn((96, 128), 0.05)?;
    let mut failures = 0;
    for double_quant in [false, true] {
        let q = Nf4Weight::quantize(&w, double_quant).map_err(candle_core::Error::wrap)?;
        let want = q.dequantize().map_err(candle_core::Error::wrap)?;
        let on_dev = q.to_device(dev).map_err(candle_core::Error::wrap)?;
        let got = on_dev
            .dequantize()
            .map_err(candle_core::Error::wrap)?
            .to_device(&Device::Cpu)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let ok = diff == 0.0;
        failures += usize::from(!ok);
        println!(
            "{{\"op\":\"nf4_dequantize\",\"device\":\"{}\",\"double_quant\":{double_quant},\"max_abs_diff\":{diff:e},\"ok\":{ok}}}",
            if dev.is_cpu() { "cpu" } else { "cuda" }
        );
    }
    Ok(failures)
}

/// Runs `f` on prepared inputs, backpropagates `sum(y ⊙ c)`; returns y and the gradients of the
/// inputs that get one, all as f32 on the CPU.
fn run(case: &Case, f: &OpFn, dev: &Device, dtype: DType, c: &Tensor) -> Result<Vec<Tensor>> {
    let mut vars = Vec::new();
    let mut args = Vec::new();
    for (kind, t) in &case.inputs {
        let t = t.to_device(dev)?;
        let t = match kind {
            Kind::Act | Kind::Const => t.to_dtype(dtype)?,
            Kind::Adapter if dtype == DType::F64 => t.to_dtype(dtype)?,
            Kind::Adapter | Kind::Labels => t,
        };
        if matches!(kind, Kind::Act | Kind::Adapter) {
            let v = Var::from_tensor(&t)?;
            args.push(v.as_tensor().clone());
            vars.push(v);
        } else {
            args.push(t);
        }
    }
    let y = f(&args)?;
    let c = c.to_device(dev)?.to_dtype(y.dtype())?;
    let grads = (&y * &c)?.sum_all()?.backward()?;
    let mut out = vec![y.to_device(&Device::Cpu)?.to_dtype(DType::F64)?];
    for v in &vars {
        let g = grads
            .get(v.as_tensor())
            .expect("every Act/Adapter input gets a gradient");
        out.push(g.to_device(&Device::Cpu)?.to_dtype(DType::F64)?);
    }
    Ok(out)
}

fn check(case: &Case, dev: &Device, dtype: DType, cpu_only: bool) -> Result<(f64, f64)> {
    let y0 = (case.fused)(
        &case
            .inputs
            .iter()
            .map(|(_, t)| t.clone())
            .collect::<Vec<_>>(),
    )?;
    let c = Tensor::randn(0f32, 1., y0.shape(), &Device::Cpu)?;
    let (got, want) = if cpu_only {
        (
            run(case, &*case.fused, dev, dtype, &c)?,
            run(case, &*case.composition, dev, dtype, &c)?,
        )
    } else {
        (
            run(case, &*case.fused, dev, dtype, &c)?,
            run(case, &*case.fused, &Device::Cpu, DType::F32, &c)?,
        )
    };
    let mut err = 0f64;
    for (g, w) in got.iter().zip(&want) {
        let diff = (g - w)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let scale = w.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
        err = err.max(diff / scale);
    }
    let tol = match dtype {
        DType::BF16 | DType::F16 => 4e-2,
        DType::F64 => 1e-9,
        _ if cpu_only => 1e-5,
        _ => 1e-4,
    };
    Ok((err, tol))
}

fn randn(shape: impl Into<candle_core::Shape>, std: f32) -> Result<Tensor> {
    Tensor::randn(0f32, std, shape, &Device::Cpu)
}

fn cases() -> Result<Vec<Case>> {
    let (b, t, hidden, inter, heads, hd, vocab, rank) = (2, 64, 576, 1536, 9, 64, 3000, 16);
    let labels: Vec<i64> = (0..b * t)
        .map(|i| {
            if i % 7 == 0 {
                -100
            } else {
                (i * 7919 % vocab) as i64
            }
        })
        .collect();
    let angles = randn((b, 1, t, hd), 3.)?;
    Ok(vec![
        Case {
            name: "rms_norm",
            inputs: vec![
                (Kind::Act, randn((b, t, hidden), 1.)?),
                (Kind::Const, (randn(hidden, 0.1)? + 1.)?),
            ],
            fused: Box::new(|a| peft_kernels::rms_norm(&a[0], &a[1], 1e-5)),
            composition: Box::new(|a| {
                let r = (a[0].sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
                    .sqrt()?
                    .recip()?;
                a[0].broadcast_mul(&r)?.broadcast_mul(&a[1].detach())
            }),
        },
        Case {
            name: "rope",
            inputs: vec![
                (Kind::Act, randn((b, t, heads, hd), 1.)?),
                (Kind::Const, angles.cos()?),
                (Kind::Const, angles.sin()?),
            ],
            // q as the projection lays it out, viewed as [b, heads, t, d].
            fused: Box::new(|a| peft_kernels::rope(&a[0].transpose(1, 2)?, &a[1], &a[2])),
            composition: Box::new(|a| {
                let x = a[0].transpose(1, 2)?.contiguous()?;
                let half = x.dim(D::Minus1)? / 2;
                let rot = Tensor::cat(
                    &[
                        &x.narrow(D::Minus1, half, half)?.neg()?,
                        &x.narrow(D::Minus1, 0, half)?,
                    ],
                    D::Minus1,
                )?;
                x.broadcast_mul(&a[1].detach())? + rot.broadcast_mul(&a[2].detach())?
            }),
        },
        Case {
            name: "swiglu",
            inputs: vec![
                (Kind::Act, randn((b, t, inter), 2.)?),
                (Kind::Act, randn((b, t, inter), 1.)?),
            ],
            fused: Box::new(|a| peft_kernels::swiglu(&a[0], &a[1])),
            composition: Box::new(|a| a[0].silu()? * &a[1]),
        },
        Case {
            name: "lora_linear",
            inputs: vec![
                (Kind::Act, randn((b, t, hidden), 1.)?),
                (Kind::Const, randn((inter, hidden), 0.04)?),
                (Kind::Adapter, randn((rank, hidden), 0.04)?),
                (Kind::Adapter, randn((inter, rank), 0.1)?),
            ],
            fused: Box::new(|a| peft_kernels::lora_linear(&a[0], &a[1], &a[2], &a[3], 2.0)),
            composition: Box::new(|a| {
                let w = a[1].detach();
                let base = a[0].broadcast_matmul(&w.t()?)?;
                let xa = a[0].broadcast_matmul(&a[2].t()?)?;
                base + (xa.broadcast_matmul(&a[3].t()?)? * 2.0)?
            }),
        },
        Case {
            name: "nf4_linear",
            inputs: vec![
                (Kind::Act, randn((b, t, hidden), 1.)?),
                // f32 on every run, so every device quantizes the same values.
                (Kind::Labels, randn((inter, hidden), 0.04)?),
            ],
            fused: Box::new(|a| {
                let q = Nf4Weight::quantize(&a[1], true).map_err(candle_core::Error::wrap)?;
                let y = q.forward(&a[0]).map_err(candle_core::Error::wrap)?;
                y.to_dtype(a[0].dtype())
            }),
            composition: Box::new(|a| {
                let q = Nf4Weight::quantize(&a[1], true).map_err(candle_core::Error::wrap)?;
                let w = q.dequantize().map_err(candle_core::Error::wrap)?;
                a[0].broadcast_matmul(&w.to_dtype(a[0].dtype())?.t()?)
            }),
        },
        Case {
            name: "cross_entropy",
            inputs: vec![
                (Kind::Act, randn((b, t, hidden), 1.)?),
                (Kind::Const, randn((vocab, hidden), 0.05)?),
                (
                    Kind::Labels,
                    Tensor::from_vec(labels, (b, t), &Device::Cpu)?,
                ),
            ],
            // Chunks of 1024 over a 3000-row vocabulary: three full chunks and a partial one.
            fused: Box::new(|a| {
                Ok(peft_kernels::fused_linear_cross_entropy(&a[0], &a[1], &a[2], 1024)?.0)
            }),
            composition: Box::new(|a| {
                let v = a[1].dim(0)?;
                let logits = a[0]
                    .broadcast_matmul(&a[1].detach().t()?)?
                    .reshape(((), v))?;
                let max = logits.max_keepdim(1)?.detach();
                let shifted = logits.broadcast_sub(&max)?;
                let lsm = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)?;
                let labels: Vec<i64> = a[2].flatten_all()?.to_vec1()?;
                let idx: Vec<u32> = labels.iter().map(|&y| y.max(0) as u32).collect();
                let w: Vec<f64> = labels
                    .iter()
                    .map(|&y| if y < 0 { 0. } else { 1. })
                    .collect();
                let count = w.iter().sum::<f64>();
                let idx = Tensor::from_vec(idx, (labels.len(), 1), a[0].device())?;
                let w = Tensor::from_vec(w, labels.len(), a[0].device())?.to_dtype(lsm.dtype())?;
                let picked = lsm.gather(&idx, 1)?.squeeze(1)?;
                (picked * w)?.sum_all()? / -count
            }),
        },
    ])
}
