//! The CUDA kernels of `peft-kernels` (`kernels/cuda/*.cu`), compiled as C++ and run on CPU
//! threads (one OS thread per CUDA thread of a block, blocks one after another), so that their
//! indexing, reductions and arithmetic are tested on machines without a GPU. What this cannot
//! test: the PTX compiler, the driver, cudarc's argument passing and candle's CUDA storage; the
//! GPU check (`scripts/gpu-check.sh`) covers those on a GPU.
//!
//! Each wrapper launches one kernel with the geometry the caller passes (the tests pass
//! `peft_kernels::launch`'s, as the CUDA launchers do) over host slices. The wrappers are as
//! unchecked as a kernel launch: the slices must be as long as the kernel will index.

use std::ffi::c_void;

pub use half::{bf16, f16};

/// An element type the kernels are instantiated for (`float`, `__nv_bfloat16`, `__half`).
pub trait Elem: Copy + Send + Sync + 'static {
    const KERNELS: Kernels<Self>;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

/// The entry points of one instantiation (the `_f32`, `_bf16` or `_f16` symbols).
#[allow(clippy::type_complexity)]
pub struct Kernels<T: 'static> {
    pub rms_norm_fwd: unsafe extern "C" fn(*const T, *const T, *mut T, u32, f32),
    pub rms_norm_bwd: unsafe extern "C" fn(*const T, *const T, *const T, *mut T, u32, f32),
    pub rope: unsafe extern "C" fn(
        *const T,
        *const T,
        *const T,
        *mut T,
        u32,
        u32,
        u32,
        u32,
        u64,
        u64,
        u64,
        u32,
        u32,
    ),
    pub swiglu_fwd: unsafe extern "C" fn(*const T, *const T, *mut T, u64),
    pub swiglu_bwd: unsafe extern "C" fn(*const T, *const T, *const T, *mut T, u64),
    pub add_low_rank:
        unsafe extern "C" fn(*mut T, *const T, *const T, u32, u32, u32, u64, u64, f32),
    pub ce_chunk_stats: unsafe extern "C" fn(*const T, *const u32, *const f32, *mut f32, u32, u32),
    pub ce_exp_shifted: unsafe extern "C" fn(*mut T, *const f32, u32, u32),
    pub nf4_dequant_plain:
        unsafe extern "C" fn(*const u8, *const f32, *const f32, u32, *mut T, u64),
    pub nf4_dequant_nested: unsafe extern "C" fn(
        *const u8,
        *const f32,
        *const u8,
        *const f32,
        *const f32,
        u32,
        f32,
        u32,
        *mut T,
        u64,
    ),
}

macro_rules! instantiation {
    ($t:ty, $suffix:literal, $to:expr, $from:expr) => {
        impl Elem for $t {
            const KERNELS: Kernels<$t> = {
                extern "C" {
                    #[link_name = concat!("rms_norm_fwd_", $suffix)]
                    fn rms_norm_fwd(x: *const $t, w: *const $t, y: *mut $t, d: u32, eps: f32);
                    #[link_name = concat!("rms_norm_bwd_", $suffix)]
                    fn rms_norm_bwd(
                        x: *const $t,
                        w: *const $t,
                        dy: *const $t,
                        dx: *mut $t,
                        d: u32,
                        eps: f32,
                    );
                    #[link_name = concat!("rope_", $suffix)]
                    fn rope(
                        x: *const $t,
                        cos: *const $t,
                        sin: *const $t,
                        y: *mut $t,
                        b: u32,
                        h: u32,
                        t: u32,
                        d: u32,
                        xs0: u64,
                        xs1: u64,
                        xs2: u64,
                        per_batch: u32,
                        transpose: u32,
                    );
                    #[link_name = concat!("swiglu_fwd_", $suffix)]
                    fn swiglu_fwd(g: *const $t, u: *const $t, h: *mut $t, n: u64);
                    #[link_name = concat!("swiglu_bwd_", $suffix)]
                    fn swiglu_bwd(g: *const $t, u: *const $t, dh: *const $t, out: *mut $t, n: u64);
                    #[link_name = concat!("add_low_rank_", $suffix)]
                    fn add_low_rank(
                        y: *mut $t,
                        xa: *const $t,
                        b: *const $t,
                        m: u32,
                        n: u32,
                        r: u32,
                        sk: u64,
                        so: u64,
                        scale: f32,
                    );
                    #[link_name = concat!("ce_chunk_stats_", $suffix)]
                    fn ce_chunk_stats(
                        logits: *const $t,
                        targets: *const u32,
                        st: *const f32,
                        out: *mut f32,
                        c: u32,
                        v0: u32,
                    );
                    #[link_name = concat!("ce_exp_shifted_", $suffix)]
                    fn ce_exp_shifted(logits: *mut $t, st: *const f32, n: u32, c: u32);
                    #[link_name = concat!("nf4_dequant_plain_", $suffix)]
                    fn nf4_dequant_plain(
                        packed: *const u8,
                        code16: *const f32,
                        absmax: *const f32,
                        blocksize: u32,
                        out: *mut $t,
                        n: u64,
                    );
                    #[link_name = concat!("nf4_dequant_nested_", $suffix)]
                    fn nf4_dequant_nested(
                        packed: *const u8,
                        code16: *const f32,
                        qabsmax: *const u8,
                        map256: *const f32,
                        nested: *const f32,
                        nested_blocksize: u32,
                        offset: f32,
                        blocksize: u32,
                        out: *mut $t,
                        n: u64,
                    );
                }
                Kernels {
                    rms_norm_fwd,
                    rms_norm_bwd,
                    rope,
                    swiglu_fwd,
                    swiglu_bwd,
                    add_low_rank,
                    ce_chunk_stats,
                    ce_exp_shifted,
                    nf4_dequant_plain,
                    nf4_dequant_nested,
                }
            };
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            fn to_f32(self) -> f32 {
                $to(self)
            }
        }
    };
}

instantiation!(f32, "f32", |v: f32| v, |v: f32| v);
instantiation!(bf16, "bf16", bf16::to_f32, bf16::from_f32);
instantiation!(f16, "f16", f16::to_f32, f16::from_f32);

/// The AdamW kernels (f32 parameters and gradients only). The seven trailing scalars are
/// `AdamWStep`'s fields in declaration order.
pub mod adamw {
    extern "C" {
        pub fn adamw_moments_f32(
            g: *const f32,
            st: *const f32,
            out: *mut f32,
            n: u64,
            decay: f32,
            one_minus_beta1: f32,
            beta2: f32,
            one_minus_beta2: f32,
            step_size: f32,
            bc2_sqrt: f32,
            eps: f32,
        );
        pub fn adamw_param_f32(
            p: *const f32,
            g: *const f32,
            st: *const f32,
            out: *mut f32,
            n: u64,
            decay: f32,
            one_minus_beta1: f32,
            beta2: f32,
            one_minus_beta2: f32,
            step_size: f32,
            bc2_sqrt: f32,
            eps: f32,
        );
        pub fn adamw8_moments(
            g: *const f32,
            st: *const u8,
            out: *mut u8,
            n: u64,
            scales_offset: u32,
            decay: f32,
            one_minus_beta1: f32,
            beta2: f32,
            one_minus_beta2: f32,
            step_size: f32,
            bc2_sqrt: f32,
            eps: f32,
        );
        pub fn adamw8_param(
            p: *const f32,
            g: *const f32,
            st: *const u8,
            out: *mut f32,
            n: u64,
            scales_offset: u32,
            decay: f32,
            one_minus_beta1: f32,
            beta2: f32,
            one_minus_beta2: f32,
            step_size: f32,
            bc2_sqrt: f32,
            eps: f32,
        );
    }
}

extern "C" {
    fn peft_emu_launch(
        grid: u32,
        block: u32,
        body: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
    ) -> i32;
}

/// A geometry a GPU would refuse (no blocks, no threads, or more than 1024 per block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedGeometry {
    pub grid: u32,
    pub block: u32,
}

/// Runs `kernel` as every thread of a `grid` x `block` launch (`kernel` calls one entry point of
/// [`Kernels`]; the launch's thread and block indices are set around it). Launches run one at a
/// time.
pub fn launch<F: Fn() + Sync>(grid: u32, block: u32, kernel: F) -> Result<(), RefusedGeometry> {
    extern "C" fn call<F: Fn()>(ctx: *mut c_void) {
        // SAFETY: ctx is the `&F` passed below, alive for the whole launch.
        let f = unsafe { &*(ctx as *const F) };
        f()
    }
    // SAFETY: `call::<F>` reads ctx as the `&F` it is; F is Sync, so calling it from the
    // launch's threads at once is sound.
    let rc = unsafe { peft_emu_launch(grid, block, call::<F>, &kernel as *const F as *mut c_void) };
    if rc == 0 {
        Ok(())
    } else {
        Err(RefusedGeometry { grid, block })
    }
}

/// A pointer the launch's threads may share (what a device pointer is to a kernel).
#[derive(Clone, Copy)]
pub struct Shared<T>(pub *mut T);

// SAFETY: the kernels, like on a GPU, decide which thread writes where; the tests give each
// launch buffers that outlive it.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub fn of(s: &[T]) -> Self {
        Shared(s.as_ptr() as *mut T)
    }
    pub fn of_mut(s: &mut [T]) -> Self {
        Shared(s.as_mut_ptr())
    }
    pub fn get(self) -> *mut T {
        self.0
    }
}
