//! Launchers for the kernels in `cuda/*.cu` (PTX built by `build.rs` with nvcc), on candle's
//! CUDA device and stream. Activations are f32, bf16 or f16 (f32 arithmetic in the kernels);
//! the cross-entropy state is always f32.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use crate::adamw::adamw8::{Layout8, BLOCK as ADAM8_BLOCK};
use crate::adamw::AdamWStep;
use crate::launch::{elementwise, one_block_per_row, Geometry};
use crate::rope::RopeDims;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// Kernel-name suffix of a dtype (`rms_norm_fwd_bf16`, ...).
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("peft-kernels CUDA: unsupported dtype {other:?}"),
    })
}

/// Calls `$f::<T>` for the storage's element type.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            other => bail!("peft-kernels CUDA: unsupported dtype {other:?}"),
        }
    };
}

/// `name_<dtype suffix>`.
fn kname(name: &str, dtype: DType) -> Result<String> {
    Ok(format!("{name}_{}", suffix(dtype)?))
}

/// The contiguous elements of `s` under `l`.
fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!(
            "peft-kernels CUDA: expected a contiguous input, got strides {:?}",
            l.stride()
        )
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

fn config(g: Geometry) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (g.grid, 1, 1),
        block_dim: (g.block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that follows.
    unsafe { dev.alloc::<T>(n) }
}

pub(crate) fn rms_norm_fwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (xv, wv) = (view::<T>(x, xl)?, view::<T>(w, wl)?);
        let y = alloc::<T>(&dev, rows * d)?;
        let f = dev.get_or_load_custom_func(
            &kname("rms_norm_fwd", x.dtype())?,
            "peft_rmsnorm",
            ptx::RMSNORM,
        )?;
        let mut b = f.builder();
        b.arg(&xv).arg(&wv).arg(&y);
        candle_core::builder_arg!(b, d as u32, eps);
        unsafe { b.launch(config(one_block_per_row(rows, d))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
    by_dtype!(x.dtype(), run(x, xl, w, wl, rows, d, eps))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm_bwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (xv, wv, gv) = (view::<T>(x, xl)?, view::<T>(w, wl)?, view::<T>(dy, dyl)?);
        let dx = alloc::<T>(&dev, rows * d)?;
        let f = dev.get_or_load_custom_func(
            &kname("rms_norm_bwd", x.dtype())?,
            "peft_rmsnorm",
            ptx::RMSNORM,
        )?;
        let mut b = f.builder();
        b.arg(&xv).arg(&wv).arg(&gv).arg(&dx);
        candle_core::builder_arg!(b, d as u32, eps);
        unsafe { b.launch(config(one_block_per_row(rows, d))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }
    by_dtype!(x.dtype(), run(x, xl, w, wl, dy, dyl, rows, d, eps))
}

pub(crate) fn rope(
    x: &CudaStorage,
    cos: &CudaStorage,
    cl: &Layout,
    sin: &CudaStorage,
    sl: &Layout,
    g: &RopeDims,
    transpose: bool,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        x: &CudaStorage,
        cos: &CudaStorage,
        cl: &Layout,
        sin: &CudaStorage,
        sl: &Layout,
        g: &RopeDims,
        transpose: bool,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let xv = x.as_cuda_slice::<T>()?.slice(g.x_off..);
        let (cv, sv) = (view::<T>(cos, cl)?, view::<T>(sin, sl)?);
        let n = g.b * g.h * g.t * g.d;
        let y = alloc::<T>(&dev, n)?;
        let f = dev.get_or_load_custom_func(&kname("rope", x.dtype())?, "peft_rope", ptx::ROPE)?;
        let mut b = f.builder();
        b.arg(&xv).arg(&cv).arg(&sv).arg(&y);
        candle_core::builder_arg!(
            b,
            g.b as u32,
            g.h as u32,
            g.t as u32,
            g.d as u32,
            g.xs[0] as u64,
            g.xs[1] as u64,
            g.xs[2] as u64,
            g.per_batch as u32,
            transpose as u32
        );
        unsafe { b.launch(config(elementwise(n / 2))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
    by_dtype!(x.dtype(), run(x, cos, cl, sin, sl, g, transpose))
}

pub(crate) fn swiglu_fwd(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
    ) -> Result<CudaStorage> {
        let dev = g.device().clone();
        let n = gl.shape().elem_count();
        let (gv, uv) = (view::<T>(g, gl)?, view::<T>(u, ul)?);
        let h = alloc::<T>(&dev, n)?;
        let f = dev.get_or_load_custom_func(
            &kname("swiglu_fwd", g.dtype())?,
            "peft_swiglu",
            ptx::SWIGLU,
        )?;
        let mut b = f.builder();
        b.arg(&gv).arg(&uv).arg(&h);
        candle_core::builder_arg!(b, n as u64);
        unsafe { b.launch(config(elementwise(n))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(h, dev))
    }
    by_dtype!(g.dtype(), run(g, gl, u, ul))
}

pub(crate) fn swiglu_bwd(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
    dh: &CudaStorage,
    dhl: &Layout,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
        dh: &CudaStorage,
        dhl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = g.device().clone();
        let n = gl.shape().elem_count();
        let (gv, uv, dv) = (view::<T>(g, gl)?, view::<T>(u, ul)?, view::<T>(dh, dhl)?);
        let out = alloc::<T>(&dev, 2 * n)?;
        let f = dev.get_or_load_custom_func(
            &kname("swiglu_bwd", g.dtype())?,
            "peft_swiglu",
            ptx::SWIGLU,
        )?;
        let mut b = f.builder();
        b.arg(&gv).arg(&uv).arg(&dv).arg(&out);
        candle_core::builder_arg!(b, n as u64);
        unsafe { b.launch(config(elementwise(n))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(g.dtype(), run(g, gl, u, ul, dh, dhl))
}

/// In place: `y[i, o] += scale·Σ_k xa[i, k]·b[k·sk + o·so]` for `y: [m, n]` (contiguous from
/// offset 0, as a fresh matmul result is) and contiguous `xa: [m, r]`, `b`.
pub(crate) fn add_low_rank(
    y: &mut CudaStorage,
    (xa, xal): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    (m, n, r): (usize, usize, usize),
    (sk, so): (usize, usize),
    scale: f32,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(
        y: &mut CudaStorage,
        (xa, xal): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
        (m, n, r): (usize, usize, usize),
        (sk, so): (usize, usize),
        scale: f32,
    ) -> Result<()> {
        let dev = xa.device().clone();
        let f = dev.get_or_load_custom_func(
            &kname("add_low_rank", xa.dtype())?,
            "peft_lora",
            ptx::LORA,
        )?;
        let (xv, bv) = (view::<T>(xa, xal)?, view::<T>(b, bl)?);
        let yv = y.as_cuda_slice_mut::<T>()?;
        let mut bl = f.builder();
        bl.arg(yv).arg(&xv).arg(&bv);
        candle_core::builder_arg!(bl, m as u32, n as u32, r as u32, sk as u64, so as u64, scale);
        unsafe { bl.launch(config(elementwise(m * n))) }.w()?;
        Ok(())
    }
    if y.dtype() != xa.dtype() || b.dtype() != xa.dtype() {
        bail!("add_low_rank: mixed dtypes")
    }
    by_dtype!(
        xa.dtype(),
        run(y, (xa, xal), (b, bl), (m, n, r), (sk, so), scale)
    )
}

pub(crate) fn ce_chunk_stats(
    l: &CudaStorage,
    ll: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    st: &CudaStorage,
    sl: &Layout,
    v0: usize,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        l: &CudaStorage,
        ll: &Layout,
        t: &CudaStorage,
        tl: &Layout,
        st: &CudaStorage,
        sl: &Layout,
        v0: usize,
    ) -> Result<CudaStorage> {
        let dev = l.device().clone();
        let (n, c) = ll.shape().dims2()?;
        let lv = view::<T>(l, ll)?;
        let tv = view::<u32>(t, tl)?;
        let sv = view::<f32>(st, sl)?;
        let out = alloc::<f32>(&dev, n * 4)?;
        let f = dev.get_or_load_custom_func(
            &kname("ce_chunk_stats", l.dtype())?,
            "peft_ce",
            ptx::CROSS_ENTROPY,
        )?;
        let mut b = f.builder();
        b.arg(&lv).arg(&tv).arg(&sv).arg(&out);
        candle_core::builder_arg!(b, c as u32, v0 as u32);
        unsafe { b.launch(config(one_block_per_row(n, c))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    if st.dtype() != DType::F32 {
        bail!("cross_entropy CUDA: state must be f32 (f64 is CPU-only)")
    }
    by_dtype!(l.dtype(), run(l, ll, t, tl, st, sl, v0))
}

pub(crate) fn ce_exp_shifted(
    l: &mut CudaStorage,
    ll: &Layout,
    st: &CudaStorage,
    sl: &Layout,
) -> Result<()> {
    fn run<T: CudaDType + DeviceRepr>(
        l: &mut CudaStorage,
        ll: &Layout,
        st: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        let dev = st.device().clone();
        let (n, c) = ll.shape().dims2()?;
        let Some((a, e)) = ll.contiguous_offsets() else {
            bail!("ce: logits not contiguous")
        };
        let sv = view::<f32>(st, sl)?;
        let dtype = l.dtype();
        let f = dev.get_or_load_custom_func(
            &kname("ce_exp_shifted", dtype)?,
            "peft_ce",
            ptx::CROSS_ENTROPY,
        )?;
        let mut lv = l.as_cuda_slice_mut::<T>()?.slice_mut(a..e);
        let mut b = f.builder();
        b.arg(&mut lv).arg(&sv);
        candle_core::builder_arg!(b, n as u32, c as u32);
        unsafe { b.launch(config(elementwise(n * c))) }.w()?;
        Ok(())
    }
    by_dtype!(l.dtype(), run(l, ll, st, sl))
}

/// The block scales of an NF4 matrix on the device, as the dequantize kernels take them.
pub(crate) enum Nf4DeviceScales<'a> {
    Plain(&'a CudaStorage, &'a Layout),
    Nested {
        codes: (&'a CudaStorage, &'a Layout),
        map: (&'a CudaStorage, &'a Layout),
        nested: (&'a CudaStorage, &'a Layout),
        nested_blocksize: usize,
        offset: f32,
    },
}

/// The `n` elements of an NF4 matrix dequantized into a new buffer of `dtype`.
pub(crate) fn nf4_dequantize(
    packed: (&CudaStorage, &Layout),
    code: (&CudaStorage, &Layout),
    scales: &Nf4DeviceScales<'_>,
    blocksize: usize,
    n: usize,
    dtype: DType,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        packed: (&CudaStorage, &Layout),
        code: (&CudaStorage, &Layout),
        scales: &Nf4DeviceScales<'_>,
        blocksize: usize,
        n: usize,
        dtype: DType,
    ) -> Result<CudaStorage> {
        let dev = packed.0.device().clone();
        let pv = view::<u8>(packed.0, packed.1)?;
        let cv = view::<f32>(code.0, code.1)?;
        let out = alloc::<T>(&dev, n)?;
        let cfg = config(elementwise(n.div_ceil(2)));
        match scales {
            Nf4DeviceScales::Plain(s, l) => {
                let av = view::<f32>(s, l)?;
                let f = dev.get_or_load_custom_func(
                    &kname("nf4_dequant_plain", dtype)?,
                    "peft_nf4",
                    ptx::NF4,
                )?;
                let mut b = f.builder();
                b.arg(&pv).arg(&cv).arg(&av);
                candle_core::builder_arg!(b, blocksize as u32);
                b.arg(&out);
                candle_core::builder_arg!(b, n as u64);
                unsafe { b.launch(cfg) }.w()?;
            }
            Nf4DeviceScales::Nested {
                codes,
                map,
                nested,
                nested_blocksize,
                offset,
            } => {
                let qv = view::<u8>(codes.0, codes.1)?;
                let mv = view::<f32>(map.0, map.1)?;
                let nv = view::<f32>(nested.0, nested.1)?;
                let f = dev.get_or_load_custom_func(
                    &kname("nf4_dequant_nested", dtype)?,
                    "peft_nf4",
                    ptx::NF4,
                )?;
                let mut b = f.builder();
                b.arg(&pv).arg(&cv).arg(&qv).arg(&mv).arg(&nv);
                candle_core::builder_arg!(b, *nested_blocksize as u32, *offset, blocksize as u32);
                b.arg(&out);
                candle_core::builder_arg!(b, n as u64);
                unsafe { b.launch(cfg) }.w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(dtype, run(packed, code, scales, blocksize, n, dtype))
}

/// Pushes the AdamW step's scalars in `cuda/adamw.cu`'s `ADAMW_ARGS` order.
macro_rules! adamw_args {
    ($b:ident, $s:expr) => {
        candle_core::builder_arg!(
            $b,
            $s.decay,
            $s.one_minus_beta1,
            $s.beta2,
            $s.one_minus_beta2,
            $s.step_size,
            $s.bias_correction2_sqrt,
            $s.eps
        )
    };
}

/// `(g, [m; v]) -> [m'; v']`, f32.
pub(crate) fn adamw_moments(
    g: &CudaStorage,
    gl: &Layout,
    st: &CudaStorage,
    sl: &Layout,
    s: &AdamWStep,
) -> Result<CudaStorage> {
    let dev = g.device().clone();
    let n = gl.shape().elem_count();
    let (gv, sv) = (view::<f32>(g, gl)?, view::<f32>(st, sl)?);
    let out = alloc::<f32>(&dev, 2 * n)?;
    let f = dev.get_or_load_custom_func("adamw_moments_f32", "peft_adamw", ptx::ADAMW)?;
    let mut b = f.builder();
    b.arg(&gv).arg(&sv).arg(&out);
    candle_core::builder_arg!(b, n as u64);
    adamw_args!(b, s);
    unsafe { b.launch(config(elementwise(n))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `(p, g, [m; v]) -> p'`, f32.
pub(crate) fn adamw_param(
    p: &CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    st: &CudaStorage,
    sl: &Layout,
    s: &AdamWStep,
) -> Result<CudaStorage> {
    let dev = p.device().clone();
    let n = pl.shape().elem_count();
    let (pv, gv, sv) = (
        view::<f32>(p, pl)?,
        view::<f32>(g, gl)?,
        view::<f32>(st, sl)?,
    );
    let out = alloc::<f32>(&dev, n)?;
    let f = dev.get_or_load_custom_func("adamw_param_f32", "peft_adamw", ptx::ADAMW)?;
    let mut b = f.builder();
    b.arg(&pv).arg(&gv).arg(&sv).arg(&out);
    candle_core::builder_arg!(b, n as u64);
    adamw_args!(b, s);
    unsafe { b.launch(config(elementwise(n))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The 8-bit state's bytes, checked to start where its f32 scales stay 4-byte aligned.
fn state8<'a>(st: &'a CudaStorage, sl: &Layout) -> Result<CudaView<'a, u8>> {
    if !sl.start_offset().is_multiple_of(4) {
        bail!("adamw_8bit CUDA: the state must start 4-byte aligned")
    }
    view::<u8>(st, sl)
}

/// `(g, state) -> state'` for the 8-bit state.
pub(crate) fn adamw8_moments(
    g: &CudaStorage,
    gl: &Layout,
    st: &CudaStorage,
    sl: &Layout,
    layout: &Layout8,
    s: &AdamWStep,
) -> Result<CudaStorage> {
    let dev = g.device().clone();
    let (gv, sv) = (view::<f32>(g, gl)?, state8(st, sl)?);
    // Zeroed: the padding between codes and scales is never written by the kernel.
    let out = dev.alloc_zeros::<u8>(layout.bytes())?;
    let f = dev.get_or_load_custom_func("adamw8_moments", "peft_adamw", ptx::ADAMW)?;
    let mut b = f.builder();
    b.arg(&gv).arg(&sv).arg(&out);
    candle_core::builder_arg!(b, layout.n as u64, layout.scales_offset as u32);
    adamw_args!(b, s);
    unsafe { b.launch(config(one_block_per_row(layout.blocks, ADAM8_BLOCK))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `(p, g, state) -> p'` for the 8-bit state.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw8_param(
    p: &CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    st: &CudaStorage,
    sl: &Layout,
    layout: &Layout8,
    s: &AdamWStep,
) -> Result<CudaStorage> {
    let dev = p.device().clone();
    let (pv, gv, sv) = (view::<f32>(p, pl)?, view::<f32>(g, gl)?, state8(st, sl)?);
    let out = alloc::<f32>(&dev, layout.n)?;
    let f = dev.get_or_load_custom_func("adamw8_param", "peft_adamw", ptx::ADAMW)?;
    let mut b = f.builder();
    b.arg(&pv).arg(&gv).arg(&sv).arg(&out);
    candle_core::builder_arg!(b, layout.n as u64, layout.scales_offset as u32);
    adamw_args!(b, s);
    unsafe { b.launch(config(elementwise(layout.n))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
