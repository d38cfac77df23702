//! LoRA linear: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with the base weight `W` frozen.
//!
//! One op with three differentiable inputs (x, A, B); W is captured, so no gradient is ever
//! computed or stored for it. The big products go through candle's matmul (gemm on CPU,
//! cuBLAS on CUDA); the rank-r term is added in place by a small kernel instead of a second
//! `[tokens, out]` product and an add. `x·Aᵀ` is kept from the forward for `dB`, and
//! `dy·B` is computed once for both `dx` and `dA`:
//!
//! `u = s·dy·B`, `dx = dy·W + u·A`, `dA = uᵀ·x`, `dB = s·dyᵀ·(x·Aᵀ)`.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Storage, Tensor, D,
};

use crate::common::{cpu_dtype, cpu_tensor, dispatch_float, slice, Float};
use crate::q8_gemm::{Q8Error, Q8Matrix, Q8Rows};

/// The frozen weight of a fused LoRA layer: dense, or rebuilt whenever a product needs it (a
/// quantized base dequantized for the forward and again for the backward, one layer at a
/// time, never kept).
///
/// Or held as 8-bit blocks for the integer GEMM ([`Int8Products`]): a quantized base on a CPU
/// with AVX512-VNNI, whose forward and input-gradient products then run on integers (about 3x
/// gemm's f32 throughput) at the cost of rounding each operand to 8 bits per block of 64.
#[derive(Clone)]
pub enum FrozenOperand {
    Dense(Tensor),
    OnDemand(Arc<dyn Fn() -> Result<Tensor> + Send + Sync>),
    Int8(Arc<Int8Products>),
}

/// A frozen f32 weight `[out, in]` as the integer GEMM reads it twice: along `in` for the
/// forward `x·Wᵀ`, and transposed (blocks along `out`) for the input gradient `dy·W`.
pub struct Int8Products {
    forward: Q8Matrix,
    /// Transposed: `[in, out]` in blocks along `out`.
    backward: Q8Matrix,
}

impl std::fmt::Debug for Int8Products {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Int8Products{:?}", self.dims())
    }
}

impl Int8Products {
    /// `w: [out, in]` row-major f32; both dimensions must be multiples of
    /// [`q8_gemm::BLOCK`](crate::q8_gemm::BLOCK).
    pub fn new(w: &[f32], out: usize, inp: usize) -> std::result::Result<Self, Q8Error> {
        Ok(Int8Products {
            forward: Q8Matrix::quantize(w, out, inp)?,
            backward: Q8Matrix::quantize_transposed(w, out, inp)?,
        })
    }

    /// Whether a weight of this shape can be held this way.
    pub fn fits(out: usize, inp: usize) -> bool {
        out.is_multiple_of(crate::q8_gemm::BLOCK) && inp.is_multiple_of(crate::q8_gemm::BLOCK)
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.forward.rows(), self.forward.cols())
    }

    pub fn size_in_bytes(&self) -> usize {
        self.forward.size_in_bytes() + self.backward.size_in_bytes()
    }

    /// `x·Wᵀ` for `x: [m, in]`.
    fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        crate::q8_gemm::matmul_t(x, m, &self.forward).map_err(candle_core::Error::wrap)
    }

    /// `x·Wᵀ` for activations already rounded to 8 bits (one rounding serving several
    /// products: the vocabulary chunks of a head).
    pub(crate) fn forward_rows(&self, x: &Q8Rows) -> Result<Vec<f32>> {
        crate::q8_gemm::matmul_t_rows(x, &self.forward).map_err(candle_core::Error::wrap)
    }

    /// `dy·W` for `dy: [m, out]`, as a `[m, in]` tensor on the CPU.
    pub(crate) fn input_gradient(&self, dy: &Tensor) -> Result<Tensor> {
        let m = dy.dims2()?.0;
        let dx = crate::common::with_cpu_f32(&dy.to_dtype(DType::F32)?, |dy| {
            crate::q8_gemm::matmul_t(dy, m, &self.backward)
        })?
        .map_err(candle_core::Error::wrap)?;
        Tensor::from_vec(dx, (m, self.backward.rows()), &candle_core::Device::Cpu)
    }
}

impl FrozenOperand {
    /// A dense weight (its gradient is never computed, even for a `Var`).
    pub fn dense(w: &Tensor) -> Self {
        FrozenOperand::Dense(w.detach())
    }

    /// A weight produced by `make` each time it is needed.
    pub fn on_demand(make: impl Fn() -> Result<Tensor> + Send + Sync + 'static) -> Self {
        FrozenOperand::OnDemand(Arc::new(make))
    }

    /// Held for the integer GEMM.
    pub fn int8(products: Arc<Int8Products>) -> Self {
        FrozenOperand::Int8(products)
    }

    /// In the op's compute dtype, contiguous. The integer products serve f32 only; for any
    /// other dtype they become the weight they approximate.
    pub(crate) fn in_dtype(self, dtype: DType) -> Result<Self> {
        Ok(match self {
            FrozenOperand::Dense(w) => FrozenOperand::Dense(w.to_dtype(dtype)?.contiguous()?),
            FrozenOperand::OnDemand(make) => FrozenOperand::OnDemand(Arc::new(move || {
                make()?.detach().to_dtype(dtype)?.contiguous()
            })),
            FrozenOperand::Int8(p) if dtype == DType::F32 => FrozenOperand::Int8(p),
            FrozenOperand::Int8(p) => {
                FrozenOperand::OnDemand(Arc::new(move || int8_weight(&p)?.to_dtype(dtype)))
            }
        })
    }

    /// The weight as a tensor (for the integer products: the 8-bit approximation they use).
    pub(crate) fn get(&self) -> Result<Tensor> {
        match self {
            FrozenOperand::Dense(w) => Ok(w.clone()),
            FrozenOperand::OnDemand(make) => make(),
            FrozenOperand::Int8(p) => int8_weight(p),
        }
    }

    /// `dy·W`, the input gradient's frozen product.
    pub(crate) fn input_gradient(&self, dy: &Tensor) -> Result<Tensor> {
        match self {
            FrozenOperand::Int8(p) if dy.device().is_cpu() => p.input_gradient(dy),
            _ => dy.matmul(&self.get()?),
        }
    }
}

fn int8_weight(p: &Int8Products) -> Result<Tensor> {
    let (out, inp) = p.dims();
    Tensor::from_vec(
        p.forward.dequantize(),
        (out, inp),
        &candle_core::Device::Cpu,
    )
}

/// One LoRA projection as the fused blocks take it: its frozen base (`(out, in)`), its adapter
/// and scale.
#[derive(Clone)]
pub struct LoraProjection {
    pub w: FrozenOperand,
    pub dims: (usize, usize),
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
}

impl LoraProjection {
    /// Whether the base is `[out, inp]` and the adapter fits it.
    pub(crate) fn fits(&self, out: usize, inp: usize) -> bool {
        self.dims == (out, inp)
            && self.a.dims2().ok().map(|(_, k)| k) == Some(inp)
            && self.b.dims2().ok().map(|(n, _)| n) == Some(out)
    }

    /// The adapters of several projections as one flat f32 input of a fused block (a custom op
    /// has at most three inputs), with the gradient graph; and each A and B detached, in the
    /// order `a₀, b₀, a₁, b₁, …`, for the block's own products.
    pub(crate) fn pack(projections: &[LoraProjection]) -> Result<(Tensor, Vec<Tensor>)> {
        let adapters: Vec<&Tensor> = projections.iter().flat_map(|p| [&p.a, &p.b]).collect();
        let flat = gradient_route(&adapters)?;
        Ok((flat, adapters.into_iter().map(Tensor::detach).collect()))
    }

    pub(crate) fn op(&self) -> LoraLinear {
        LoraLinear {
            w: self.w.clone(),
            scale: self.scale,
            xa: Mutex::new(None),
        }
    }

    /// The op for f32 products, before its forward has run.
    pub(crate) fn forward_keeping_op(&self) -> Result<LoraLinear> {
        Ok(LoraLinear {
            w: self.w.clone().in_dtype(DType::F32)?,
            scale: self.scale,
            xa: Mutex::new(None),
        })
    }

    /// `v·Wᵀ + s·(v·Aᵀ)·Bᵀ` for `v: [m, in]` f32 without a graph, and the op that computed it
    /// (holding `v·Aᵀ` for its [`LoraLinear::grads`]).
    pub(crate) fn forward_keeping(
        &self,
        v: &Tensor,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, LoraLinear)> {
        let op = self.forward_keeping_op()?;
        let y = v
            .contiguous()?
            .apply_op3_no_bwd(&a.contiguous()?, &b.contiguous()?, &op)?;
        Ok((y, op))
    }

    /// `v·Wᵀ + s·(v·Aᵀ)·Bᵀ` for `v: [m, in]`, without a graph.
    pub(crate) fn forward(&self, v: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        lora_linear_with(v, self.w.clone(), self.dims, a, b, self.scale)
    }
}

/// `tensors` flattened into one f32 input of a fused op, through which the op's backward sends
/// their gradients. Only its graph is used (the ops compute from the tensors themselves), so
/// its copy of the values is freed at once on the CPU: the graph keeps it until the backward,
/// which on SmolLM2 was 19 MB of adapter copies over 30 layers at the step's peak.
pub(crate) fn gradient_route(tensors: &[&Tensor]) -> Result<Tensor> {
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.flatten_all())
        .collect::<Result<_>>()?;
    // With one input `cat` would hand back that tensor, sharing the adapter's own storage.
    let flat = match flat.len() {
        1 => flat[0].copy()?,
        _ => Tensor::cat(&flat, 0)?,
    };
    crate::frozen::take_f32_values(&flat)?;
    Ok(flat)
}

/// f32 on the CPU: where the fused LoRA blocks ([`lora_linear_residual`],
/// [`crate::lora_qkv`], [`crate::lora_mlp`]) have their implementation.
pub(crate) fn cpu_f32(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}

/// Whether [`lora_linear_residual`] runs on `x`: the CPU implementation, f32.
pub fn residual_applies(x: &Tensor) -> bool {
    cpu_f32(x)
}

/// `residual + x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for `x: [.., in]`, `residual: [.., out]` (a projection onto
/// the residual stream), f32. The graph keeps `x` and `residual` (held anyway: the projection's
/// input and the stream) but not the projection's output, which the separate add would hold
/// until the backward. Gradients: `x`, `residual`, `a`, `b` (those tracked).
pub fn lora_linear_residual(x: &Tensor, residual: &Tensor, p: &LoraProjection) -> Result<Tensor> {
    let (n, k) = p.dims;
    let rows = x.elem_count() / k.max(1);
    let fits = x.dim(D::Minus1)? == k
        && residual.dim(D::Minus1)? == n
        && x.dims()[..x.rank() - 1] == residual.dims()[..residual.rank() - 1]
        && p.a.dims2()?.1 == k
        && p.b.dims2()?.0 == n;
    if !fits || x.dtype() != DType::F32 || residual.dtype() != DType::F32 {
        bail!(
            "lora_linear_residual: x {:?}, residual {:?}, w {:?}, a {:?}, b {:?} do not fit (f32)",
            x.dims(),
            residual.dims(),
            p.dims,
            p.a.dims(),
            p.b.dims()
        )
    }
    let (x2, r2) = (x.reshape((rows, k))?, residual.reshape((rows, n))?);
    let flat = gradient_route(&[&p.a, &p.b])?;
    let (xd, ad, bd) = (x2.detach(), p.a.detach(), p.b.detach());
    let y = (r2.detach() + p.forward(&xd, &ad, &bd)?)?;
    let op = p.op();
    let y = crate::frozen::reattach3((&x2, &r2, &flat), y, move |dy, _| {
        let dy = dy.contiguous()?;
        let (dx, da, db) = op.grads(&xd, &ad, &bd, &dy, (true, true, true))?;
        let d_flat = Tensor::cat(
            &[
                da.expect("asked for").flatten_all()?,
                db.expect("asked for").flatten_all()?,
            ],
            0,
        )?;
        Ok((dx.expect("asked for"), dy, d_flat))
    })?;
    y.reshape(residual.shape())
}

/// `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ` for `x: [.., in]`, `w: [out, in]` (frozen), `a: [r, in]`,
/// `b: [out, r]`. Returns `[.., out]` in `x`'s dtype.
///
/// Gradients: `x`, `a` and `b` (those that are tracked); never `w`, even if it is a `Var`.
/// `w` must have `x`'s dtype; `a`/`b` may be f32 while `x` is bf16 (CUDA): they are cast to
/// `x`'s dtype inside the graph, so their gradients come back in their own dtype.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if w.dtype() != x.dtype() {
        bail!("lora_linear: w is {:?}, x is {:?}", w.dtype(), x.dtype())
    }
    lora_linear_with(x, FrozenOperand::dense(w), w.dims2()?, a, b, scale)
}

/// [`lora_linear`] with the frozen weight given as a [`FrozenOperand`] of shape
/// `w_dims = (out, in)`: an on-demand weight is materialised for the forward's product and
/// again for the backward's, and dropped after each.
pub fn lora_linear_with(
    x: &Tensor,
    w: FrozenOperand,
    (n, kw): (usize, usize),
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let (r, ka) = a.dims2()?;
    let (nb, rb) = b.dims2()?;
    if kw != k || ka != k || nb != n || rb != r {
        bail!(
            "lora_linear: x {:?}, w {:?}, a {:?}, b {:?} do not fit",
            x.dims(),
            (n, kw),
            a.dims(),
            b.dims()
        )
    }
    let dtype = x.dtype();
    let compute = cpu_dtype(x.device(), dtype);
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    let x2 = x.to_dtype(compute)?.reshape(((), k))?.contiguous()?;
    let op = LoraLinear {
        w: w.in_dtype(compute)?,
        scale,
        xa: Mutex::new(None),
    };
    let a = a.to_dtype(compute)?.contiguous()?;
    let b = b.to_dtype(compute)?.contiguous()?;
    x2.apply_op3(&a, &b, op)?.reshape(out_dims)?.to_dtype(dtype)
}

pub(crate) struct LoraLinear {
    pub(crate) w: FrozenOperand,
    pub(crate) scale: f64,
    /// `x·Aᵀ` from the forward, for the backward.
    pub(crate) xa: Mutex<Option<Tensor>>,
}

impl LoraLinear {
    /// `(dx, dA, dB)`, each only where `want` asks for it: `u = s·dy·B`, `dx = dy·W + u·A`,
    /// `dA = uᵀ·x`, `dB = s·dyᵀ·(x·Aᵀ)` (with `x·Aᵀ` kept from the forward when there is one).
    pub(crate) fn grads(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        (want_dx, want_da, want_db): (bool, bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.scale;
        let dy = dy.contiguous()?;
        let u = if want_dx || want_da {
            Some((dy.matmul(b)? * s)?)
        } else {
            None
        };
        let dx = match &u {
            Some(u) if want_dx => {
                let dx = self.w.input_gradient(&dy)?;
                dx.inplace_op3(u, &a.contiguous()?, &AddLowRank)?;
                Some(dx)
            }
            _ => None,
        };
        let da = match &u {
            Some(u) if want_da => Some(u.t()?.matmul(x)?),
            _ => None,
        };
        let db = if want_db {
            let saved = self.xa.lock().expect("not poisoned").clone();
            let xa = match saved {
                Some(xa) => xa,
                None => x.matmul(&a.t()?)?,
            };
            Some((dy.t()?.matmul(&xa)? * s)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }

    /// `x·Wᵀ` with the weight as a tensor (dense, or built on demand).
    fn dense_product(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        (m, k, n): (usize, usize, usize),
    ) -> Result<CpuStorage> {
        let w = self.w.get()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            bail!("lora_linear: w is not on the CPU")
        };
        Ok(
            match (x, ws, xl.contiguous_offsets(), wl.contiguous_offsets()) {
                // A few rows (decoding): the same streaming row kernel as a frozen layer's, so an
                // adapter whose B is zero changes nothing, bit for bit.
                (CpuStorage::F32(xs), CpuStorage::F32(wd), Some((x0, x1)), Some((w0, w1)))
                    if m < crate::GEMM_MIN_ROWS =>
                {
                    let y = crate::ggml_matvec::matmul_t_f32(&xs[x0..x1], m, k, &wd[w0..w1], n)
                        .map_err(candle_core::Error::msg)?;
                    CpuStorage::F32(y)
                }
                _ => x.matmul(ws, (1, m, n, k), xl, &wl.transpose(0, 1)?)?,
            },
        )
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "peft-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            y: CpuStorage,
            xa: CpuStorage,
            b: &[T],
            (m, n, r): (usize, usize, usize),
            scale: f64,
        ) -> Result<(CpuStorage, Tensor)> {
            let mut y = T::cpu_storage_data(y)?;
            let xa = T::cpu_storage_data(xa)?;
            // s·Bᵀ as [r, out]: the update is then r contiguous axpys per row.
            let s = T::from_f64(scale);
            let mut bt = vec![T::zero(); r * n];
            for (o, row) in b.chunks_exact(r).enumerate() {
                for (kk, &v) in row.iter().enumerate() {
                    bt[kk * n + o] = s * v;
                }
            }
            add_low_rank(&mut y, &xa, &bt, n, r);
            Ok((T::to_cpu_storage_owned(y), cpu_tensor(xa, &[m, r])))
        }
        let (m, k) = xl.shape().dims2()?;
        let (r, n) = (al.dims()[0], bl.dims()[0]);
        let y = match (&self.w, x, xl.contiguous_offsets()) {
            (FrozenOperand::Int8(p), CpuStorage::F32(xs), Some((x0, x1))) => {
                CpuStorage::F32(p.forward(&xs[x0..x1], m)?)
            }
            _ => self.dense_product(x, xl, (m, k, n))?,
        };
        let xa = x.matmul(a, (1, m, r, k), xl, &al.transpose(0, 1)?)?;
        let op = self.name();
        let (y, xa) = dispatch_float!(
            op,
            x.dtype(),
            run(y, xa, slice(b, bl, op)?, (m, n, r), self.scale)
        )?;
        *self.xa.lock().expect("not poisoned") = Some(xa);
        Ok((y, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (r, n) = (al.dims()[0], bl.dims()[0]);
        let w = self.w.get()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            bail!("lora_linear: w is not on the GPU")
        };
        let mut y = x.matmul(ws, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        let xa = x.matmul(a, (1, m, r, k), xl, &al.transpose(0, 1)?)?;
        // y += s·xa·Bᵀ, reading B[o, k] at o·r + k.
        let xal = Layout::contiguous((m, r));
        crate::cuda::add_low_rank(
            &mut y,
            (&xa, &xal),
            (b, bl),
            (m, n, r),
            (1, r),
            self.scale as f32,
        )?;
        let xa = Tensor::from_storage(
            Storage::Cuda(xa),
            (m, r),
            candle_core::op::BackpropOp::none(),
            false,
        );
        *self.xa.lock().expect("not poisoned") = Some(xa);
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, a, b, dy, (x.track_op(), a.track_op(), b.track_op()))
    }
}

/// `y[i, :] += Σ_k xa[i, k]·bt[k, :]` for `y: [m, n]`, `xa: [m, r]`, `bt: [r, n]`, as one
/// accumulating GEMM (gemm's AVX2/AVX-512 kernels, `dst = 1·dst + 1·xa·bt`): a rank-16 update
/// of every LoRA output and input gradient is as many FLOPs as a [tokens, 16] × [16, out]
/// product, which the plain row loops this replaced ran at a fraction of the machine's speed
/// (7% of a SmolLM2 training step).
fn add_low_rank<T: Float>(y: &mut [T], xa: &[T], bt: &[T], n: usize, r: usize) {
    let m = y.len() / n.max(1);
    if m == 0 || n == 0 || r == 0 {
        return;
    }
    assert!(
        y.len() == m * n && xa.len() == m * r && bt.len() == r * n,
        "add_low_rank: y {} / xa {} / bt {} for m {m}, n {n}, r {r}",
        y.len(),
        xa.len(),
        bt.len()
    );
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * r >= 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers, shapes and (row-major) strides describe the three slices, whose
    // lengths were checked above; `y` does not overlap the inputs (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            r,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            xa.as_ptr(),
            1,
            r as isize,
            bt.as_ptr(),
            1,
            n as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// In place: `y += xa·bt` (`dx += u·A` in the backward).
struct AddLowRank;

impl InplaceOp3 for AddLowRank {
    fn name(&self) -> &'static str {
        "peft-add-low-rank"
    }

    fn cpu_fwd(
        &self,
        y: &mut CpuStorage,
        yl: &Layout,
        xa: &CpuStorage,
        xl: &Layout,
        bt: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        fn run<T: Float>(
            y: &mut CpuStorage,
            yl: &Layout,
            xa: &[T],
            bt: &[T],
            r: usize,
        ) -> Result<()> {
            let Some((start, end)) = yl.contiguous_offsets() else {
                bail!("add_low_rank: y must be contiguous")
            };
            let n = yl.dims()[1];
            let y = T::storage_mut(y)?;
            add_low_rank(&mut y[start..end], xa, bt, n, r);
            Ok(())
        }
        let op = self.name();
        let r = xl.dims()[1];
        dispatch_float!(
            op,
            xa.dtype(),
            run(y, yl, slice(xa, xl, op)?, slice(bt, bl, op)?, r)
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &mut candle_core::CudaStorage,
        yl: &Layout,
        xa: &candle_core::CudaStorage,
        xl: &Layout,
        bt: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        if !yl.is_contiguous()
            || yl.start_offset() != 0
            || !xl.is_contiguous()
            || !bl.is_contiguous()
        {
            bail!("add_low_rank: expected contiguous operands")
        }
        let (m, n) = yl.shape().dims2()?;
        let r = xl.dims()[1];
        // bt[k, o] at k·n + o.
        crate::cuda::add_low_rank(y, (xa, xl), (bt, bl), (m, n, r), (n, 1), 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, pseudo_random};
    use candle_core::{DType, Device, Var};

    fn reference(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
        let base = x.broadcast_matmul(&w.t()?)?;
        base + (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * s)?
    }

    #[test]
    fn matches_the_composition_with_gradients_for_x_a_b_only() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let (k, n, r) = (37, 29, 4);
            let v = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype)?);
            let x = v(Tensor::randn(0f32, 1., (2, 5, k), &dev)?)?;
            let w = v(Tensor::randn(0f32, 0.2, (n, k), &dev)?)?;
            let a = v(Tensor::randn(0f32, 0.2, (r, k), &dev)?)?;
            let b = v(Tensor::randn(0f32, 0.2, (n, r), &dev)?)?;
            let c = Tensor::randn(0f32, 1., (2, 5, n), &dev)?.to_dtype(dtype)?;
            let y = lora_linear(&x, &w, &a, &b, 2.0)?;
            let g = (&y * &c)?.sum_all()?.backward()?;
            let yr = reference(&x, &w, &a, &b, 2.0)?;
            let gr = (&yr * &c)?.sum_all()?.backward()?;
            assert_close("lora y", &y, &yr, 1e-5)?;
            for (name, t) in [("dx", &x), ("dA", &a), ("dB", &b)] {
                let got = g.get(t).expect("gradient");
                assert_close(name, got, gr.get(t).expect("reference gradient"), 1e-5)?;
            }
            assert!(g.get(&w).is_none(), "no gradient for the frozen weight");
        }
        Ok(())
    }

    #[test]
    fn an_on_demand_weight_is_built_for_each_product_and_gives_the_dense_result() -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (20, 8), &dev)?;
        let w = Tensor::randn(0f32, 0.3, (5, 8), &dev)?;
        let a = Var::randn(0f32, 0.3, (2, 8), &dev)?;
        let b = Var::randn(0f32, 0.3, (5, 2), &dev)?;
        let built = Arc::new(AtomicUsize::new(0));
        let (count, wc) = (Arc::clone(&built), w.clone());
        let lazy = FrozenOperand::on_demand(move || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(wc.clone())
        });
        let y = lora_linear_with(&x, lazy, (5, 8), &a, &b, 0.5)?;
        assert_eq!(
            built.load(Ordering::SeqCst),
            1,
            "built once for the forward"
        );
        let g = y.sum_all()?.backward()?;
        assert_eq!(built.load(Ordering::SeqCst), 2, "and once more for dx");
        let yd = lora_linear(&x, &w, &a, &b, 0.5)?;
        let gd = yd.sum_all()?.backward()?;
        assert_close("on-demand y", &y, &yd, 1e-6)?;
        for t in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
            assert_close(
                "on-demand grad",
                g.get(t).unwrap(),
                gd.get(t).unwrap(),
                1e-6,
            )?;
        }
        Ok(())
    }

    #[test]
    fn int8_products_approximate_the_base_and_leave_the_adapter_gradients_exact() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n, r) = (24, 128, 192, 4);
        // Seeded: the rounding error this test bounds depends on the data.
        let data = |len: usize, seed: u64, scale: f32, shape: (usize, usize)| {
            let v: Vec<f32> = pseudo_random(len, seed).iter().map(|x| x * scale).collect();
            Tensor::from_vec(v, shape, &dev)
        };
        let x = Var::from_tensor(&data(m * k, 1, 1.7, (m, k))?)?;
        let w = data(n * k, 2, 0.5, (n, k))?;
        let a = Var::from_tensor(&data(r * k, 3, 0.5, (r, k))?)?;
        let b = Var::from_tensor(&data(n * r, 4, 0.5, (n, r))?)?;
        let c = data(m * n, 5, 1.7, (m, n))?;
        let products = Int8Products::new(&w.flatten_all()?.to_vec1::<f32>()?, n, k)
            .map_err(candle_core::Error::wrap)?;
        let y = lora_linear_with(
            &x,
            FrozenOperand::int8(Arc::new(products)),
            (n, k),
            &a,
            &b,
            0.5,
        )?;
        let g = (&y * &c)?.sum_all()?.backward()?;
        let yd = lora_linear(&x, &w, &a, &b, 0.5)?;
        let gd = (&yd * &c)?.sum_all()?.backward()?;
        let rel = |got: &Tensor, want: &Tensor| -> Result<f32> {
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(diff / want.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        // Each operand rounded to 8 bits per block of 64: about 1% of the largest value.
        let (ry, rdx) = (rel(&y, &yd)?, rel(g.get(&x).unwrap(), gd.get(&x).unwrap())?);
        assert!(ry < 1e-2 && ry > 0.0, "y: {ry}");
        assert!(rdx < 1e-2 && rdx > 0.0, "dx: {rdx}");
        eprintln!("int8 products: relative error y {ry:.2e}, dx {rdx:.2e}");
        // dA and dB do not involve W: the same as over the dense weight.
        for t in [a.as_tensor(), b.as_tensor()] {
            assert_close(
                "int8 adapter grad",
                g.get(t).unwrap(),
                gd.get(t).unwrap(),
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn a_projection_onto_the_residual_stream_matches_the_add() -> Result<()> {
        let dev = Device::Cpu;
        let (k, n, r) = (24, 16, 3);
        let x = Var::randn(0f32, 1., (2, 5, k), &dev)?;
        let res = Var::randn(0f32, 1., (2, 5, n), &dev)?;
        let w = Tensor::randn(0f32, 0.3, (n, k), &dev)?;
        let a = Var::randn(0f32, 0.3, (r, k), &dev)?;
        let b = Var::randn(0f32, 0.3, (n, r), &dev)?;
        let c = Tensor::randn(0f32, 1., (2, 5, n), &dev)?;
        let p = LoraProjection {
            w: FrozenOperand::dense(&w),
            dims: (n, k),
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 1.5,
        };
        let y = lora_linear_residual(&x, &res, &p)?;
        let yr = (res.as_tensor() + lora_linear(&x, &w, &a, &b, 1.5)?)?;
        assert_close("residual y", &y, &yr, 1e-6)?;
        let g = (&y * &c)?.sum_all()?.backward()?;
        let gr = (&yr * &c)?.sum_all()?.backward()?;
        for t in [x.as_tensor(), res.as_tensor(), a.as_tensor(), b.as_tensor()] {
            assert_close("residual grad", g.get(t).unwrap(), gr.get(t).unwrap(), 1e-5)?;
        }
        let wrong = Tensor::zeros((2, 5, n + 1), DType::F32, &dev)?;
        assert!(lora_linear_residual(&x, &wrong, &p).is_err());
        Ok(())
    }

    #[test]
    fn bf16_activations_with_f32_adapters_give_f32_adapter_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (6, 8), &dev)?;
        let w = Tensor::randn(0f32, 0.3, (5, 8), &dev)?;
        let a = Var::randn(0f32, 0.3, (2, 8), &dev)?;
        let b = Var::randn(0f32, 0.3, (5, 2), &dev)?;
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let y = lora_linear(&bf(&x)?, &bf(&w)?, &a, &b, 0.5)?;
        assert_eq!(y.dtype(), DType::BF16);
        let g = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let gr = reference(&x, &w, &a, &b, 0.5)?.sum_all()?.backward()?;
        for t in [&a, &b] {
            let got = g.get(t).expect("adapter gradient");
            assert_eq!(got.dtype(), DType::F32);
            assert_close(
                "bf16 adapter grad",
                got,
                gr.get(t).expect("reference"),
                3e-2,
            )?;
        }
        Ok(())
    }

    #[test]
    fn frozen_input_gives_adapter_gradients_only() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (6, 8), &dev)?;
        let w = Tensor::randn(0f32, 1., (5, 8), &dev)?;
        let a = Var::randn(0f32, 1., (2, 8), &dev)?;
        let b = Var::randn(0f32, 1., (5, 2), &dev)?;
        let g = lora_linear(&x, &w, &a, &b, 0.5)?.sum_all()?.backward()?;
        assert!(g.get(&a).is_some() && g.get(&b).is_some());
        assert!(g.get(&x).is_none());
        Ok(())
    }
}
