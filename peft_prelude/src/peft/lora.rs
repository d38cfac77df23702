//! LoRA (with rsLoRA scaling and DoRA) on a frozen base projection:
//! `y = W x + s · B (A dropout(x))`, DoRA: `y = m / ‖W + s·B A‖_row ⊙ (W x + s · B A x)`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use candle_core::{DType, Device, Tensor, Var, D};

use super::config::{LoraConfig, LoraInit};
use super::inject::{each_linear, each_linear_mut, target_paths, wrap};
use super::switch::AdapterSwitch;
use super::targets::{default_targets, pattern_value, DefaultFor};
use crate::error::{Error, Result};
use crate::model::linear::FrozenWeight;
use crate::model::{FrozenLinear, Linear, Model};
use crate::quant::QuantizedWeight;
use crate::rng::Rng;
use peft_kernels::frozen::matmul_t;
use peft_kernels::{FrozenOperand, Int8Products};

/// One named LoRA adapter's parameters.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
    /// DoRA magnitude `[out]`.
    pub magnitude: Option<Var>,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    /// `s · B A` as `[out, in]`, in `dtype`.
    pub fn delta_weight(&self, dtype: DType) -> Result<Tensor> {
        let delta = (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?;
        Ok(delta.to_dtype(dtype)?.detach())
    }
}

/// Adds LoRA adapter `name` to every projection `c` targets (wrapping it in a [`LoraLinear`]
/// the first time), checking the settings first. `modules_to_save` is the caller's.
pub(crate) fn add(
    model: &mut Model,
    switch: &AdapterSwitch,
    name: &str,
    c: &LoraConfig,
    rng: &mut Rng,
) -> Result<()> {
    if c.r == 0 {
        return Err(Error::Config("LoRA rank r must be positive (got 0)".into()));
    }
    if !(0.0..1.0).contains(&c.lora_dropout) {
        return Err(Error::Config(format!(
            "lora_dropout must be in [0, 1), got {}",
            c.lora_dropout
        )));
    }
    if c.fan_in_fan_out {
        return Err(Error::Config(
            "fan_in_fan_out is for GPT-2's Conv1D; Mistral/Llama use Linear".into(),
        ));
    }
    let init = match &c.init_lora_weights {
        LoraInit::Bool(true) => LoraInitKind::Default,
        LoraInit::Bool(false) => LoraInitKind::Random,
        LoraInit::Named(n) if n == "gaussian" => LoraInitKind::Gaussian,
        LoraInit::Named(n) => {
            return Err(Error::Config(format!(
                "init_lora_weights `{n}` is not supported (supported: true, false, \"gaussian\")"
            )))
        }
    };
    let targets = match &c.target_modules {
        Some(t) => t.clone(),
        None => default_targets(DefaultFor::Lora, model.config().architecture)?,
    };
    let paths = target_paths(
        model,
        &targets,
        c.exclude_modules.as_ref(),
        c.layers_to_transform.as_ref(),
    )?;
    for path in paths {
        let r = pattern_value(&c.rank_pattern, &path)?.unwrap_or(c.r);
        if r == 0 {
            return Err(Error::Config(format!(
                "rank_pattern gives r = 0 for {path}"
            )));
        }
        let alpha = pattern_value(&c.alpha_pattern, &path)?.unwrap_or(c.lora_alpha);
        let scaling = if c.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let switch = switch.clone();
        wrap::<LoraLinear>(
            model,
            &path,
            |base| LoraLinear::new(base, switch),
            |l| l.add_adapter(name, r, scaling, c.lora_dropout, c.use_dora, init, rng),
        )?;
    }
    Ok(())
}

/// Adapter `adapter`'s parameters under PEFT's saved names (`….q_proj.lora_A.weight`,
/// `….lora_B.weight`, DoRA's `….lora_magnitude_vector`).
pub(crate) fn named_vars(model: &Model, adapter: &str) -> Vec<(String, Var)> {
    let mut vars = vec![];
    for (path, l) in each_linear::<LoraLinear>(model) {
        if let Some(a) = l.adapters().get(adapter) {
            let p = format!("base_model.model.{path}");
            vars.push((format!("{p}.lora_A.weight"), a.a.clone()));
            vars.push((format!("{p}.lora_B.weight"), a.b.clone()));
            if let Some(m) = &a.magnitude {
                vars.push((format!("{p}.lora_magnitude_vector"), m.clone()));
            }
        }
    }
    vars
}

/// Removes adapter `name` from every LoRA layer.
pub(crate) fn remove(model: &mut Model, name: &str) {
    let _ = each_linear_mut::<LoraLinear>(model, |_, l| {
        l.remove_adapter(name);
        Ok(())
    });
}

/// How to initialise A and B (`init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraInitKind {
    /// Kaiming-uniform A, zero B: the adapter starts as a no-op.
    Default,
    /// A ~ N(0, 1/r²), zero B.
    Gaussian,
    /// Both random (nn.Linear's default), for tests.
    Random,
}

/// A quantized base's integer products and the base they were built from.
type Int8Cache = (Weak<dyn QuantizedWeight>, Arc<Int8Products>);

/// A projection with LoRA adapters around a frozen base.
#[derive(Debug)]
pub struct LoraLinear {
    base: Box<dyn Linear>,
    adapters: BTreeMap<String, LoraAdapter>,
    switch: AdapterSwitch,
    /// Adapter merged into the base weight, with what is needed to unmerge it
    /// (for DoRA the row norms used at merge time).
    merged: Option<(String, Option<Tensor>)>,
    /// A quantized base as the integer GEMM reads it (built at the first training batch, kept
    /// while the base is the same: the weak handle keeps the base's address from being reused).
    int8: Mutex<Option<Int8Cache>>,
}

impl LoraLinear {
    pub fn new(base: Box<dyn Linear>, switch: AdapterSwitch) -> Self {
        LoraLinear {
            base,
            adapters: BTreeMap::new(),
            switch,
            merged: None,
            int8: Mutex::new(None),
        }
    }

    /// Adds a freshly initialised adapter.
    #[allow(clippy::too_many_arguments)]
    pub fn add_adapter(
        &mut self,
        name: &str,
        r: usize,
        scaling: f64,
        dropout: f64,
        use_dora: bool,
        init: LoraInitKind,
        rng: &mut Rng,
    ) -> Result<()> {
        if r == 0 {
            return Err(Error::Config("LoRA rank r must be positive".into()));
        }
        let (out_f, in_f) = (self.base.out_features(), self.base.in_features());
        let device = self.base.base().device();
        let bound_a = 1.0 / (in_f as f64).sqrt();
        let a = match init {
            LoraInitKind::Gaussian => rng.normal(r * in_f, 0.0, 1.0 / r as f64),
            _ => rng.uniform(r * in_f, -bound_a, bound_a),
        };
        let b = match init {
            LoraInitKind::Random => {
                let bound_b = 1.0 / (r as f64).sqrt();
                rng.uniform(out_f * r, -bound_b, bound_b)
            }
            _ => vec![0.0; out_f * r],
        };
        let dtype = super::param_dtype(self.base.base().dtype());
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, in_f), &device)?.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(b, (out_f, r), &device)?.to_dtype(dtype)?)?;
        let mut adapter = LoraAdapter {
            a,
            b,
            scaling,
            dropout,
            magnitude: None,
        };
        if use_dora {
            // PEFT initialises the magnitude to the row norms of W + s·B A.
            let norms = self.row_norms(&adapter)?;
            adapter.magnitude = Some(Var::from_tensor(&norms)?);
        }
        self.adapters.insert(name.to_string(), adapter);
        Ok(())
    }

    pub fn adapters(&self) -> &BTreeMap<String, LoraAdapter> {
        &self.adapters
    }

    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut LoraAdapter> {
        self.adapters.get_mut(name)
    }

    pub fn remove_adapter(&mut self, name: &str) -> Option<LoraAdapter> {
        self.adapters.remove(name)
    }

    pub fn into_base(self) -> Box<dyn Linear> {
        self.base
    }

    /// `‖W + s·B A‖` per output row (detached: PEFT's DoRA treats the norm as a constant).
    fn row_norms(&self, adapter: &LoraAdapter) -> Result<Tensor> {
        let dtype = adapter.a.dtype();
        let w = self.base.base().dense_weight()?.to_dtype(dtype)?;
        let merged = (w + adapter.delta_weight(dtype)?)?;
        Ok(merged.sqr()?.sum(D::Minus1)?.sqrt()?.detach())
    }

    /// Adds the adapter's delta to the base weight (`merge`); the adapter stops acting
    /// separately until [`unmerge`](Self::unmerge).
    pub fn merge(&mut self, name: &str) -> Result<()> {
        if self.merged.is_some() {
            return Err(Error::InvalidArgument(
                "an adapter is already merged; unmerge it first".into(),
            ));
        }
        let dtype = self.base.base().dtype();
        let (new_w, norms) = self.merge_in_f32(name)?;
        self.base.base_mut().set_weight(new_w.to_dtype(dtype)?)?;
        self.merged = Some((name.to_string(), norms));
        Ok(())
    }

    /// The base weight with adapter `name` merged in, in f32 (a quantized base dequantized
    /// first, so nothing is rounded back into its format), without changing the layer. What a
    /// 16-bit export writes.
    pub fn merged_weight(&self, name: &str) -> Result<Tensor> {
        if self.merged_adapter() == Some(name) {
            return Ok(self.base.base().dense_weight()?.to_dtype(DType::F32)?);
        }
        Ok(self.merge_in_f32(name)?.0)
    }

    /// `W + s·B A` in f32 (DoRA: rescaled to the magnitude), with DoRA's row norms.
    fn merge_in_f32(&self, name: &str) -> Result<(Tensor, Option<Tensor>)> {
        let adapter = self
            .adapters
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("no LoRA adapter named `{name}`")))?;
        let w = self.base.base().dense_weight()?;
        let merged_w = (w.to_dtype(DType::F32)? + adapter.delta_weight(DType::F32)?)?;
        Ok(match &adapter.magnitude {
            None => (merged_w, None),
            Some(m) => {
                let norms = merged_w.sqr()?.sum(D::Minus1)?.sqrt()?;
                let scale = (m.as_tensor().detach().to_dtype(DType::F32)? / &norms)?;
                (merged_w.broadcast_mul(&scale.unsqueeze(1)?)?, Some(norms))
            }
        })
    }

    /// Subtracts a merged adapter from the base weight again.
    pub fn unmerge(&mut self) -> Result<()> {
        let Some((name, norms)) = self.merged.take() else {
            return Ok(());
        };
        let adapter = self.adapters[&name].clone();
        let w = self.base.base().dense_weight()?;
        let dtype = w.dtype();
        let mut w32 = w.to_dtype(DType::F32)?;
        if let (Some(m), Some(norms)) = (&adapter.magnitude, norms) {
            let scale = (m.as_tensor().detach() / norms)?;
            w32 = w32.broadcast_div(&scale.unsqueeze(1)?)?;
        }
        let original = (w32 - adapter.delta_weight(DType::F32)?)?;
        self.base.base_mut().set_weight(original.to_dtype(dtype)?)?;
        Ok(())
    }

    pub fn merged_adapter(&self) -> Option<&str> {
        self.merged.as_ref().map(|(n, _)| n.as_str())
    }

    pub fn device(&self) -> Device {
        self.base.base().device()
    }
}

impl LoraLinear {
    /// The common case as one fused op (`x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, backward dx, dA, dB and never
    /// dW): a dense frozen base directly under the adapter, no bias, no DoRA, no dropout
    /// acting. `None` when another path must run.
    /// The base weight as the fused op takes it, its `(out, in)` shape and the active adapter,
    /// when this layer can run as one fused op for `rows` input rows: a plain base without
    /// bias, no DoRA magnitude, no dropout in training, not merged. A dense base always; a
    /// quantized one for batches (≥ `GEMM_MIN_ROWS` rows), dequantized one layer at a time
    /// for each product (decoding keeps the quantized row kernels).
    fn fusable(&self, rows: usize) -> Option<(FrozenOperand, (usize, usize), DType, &LoraAdapter)> {
        let (active, training) = self.switch.acting()?;
        let ad = self.adapters.get(&active)?;
        let base = self.base.base();
        let plain = self.base.as_any().is::<FrozenLinear>()
            && base.bias().is_none()
            && ad.magnitude.is_none()
            && !(training && ad.dropout > 0.0)
            && self.merged_adapter() != Some(active.as_str())
            && peft_kernels::frozen::weight_gradient_protection();
        if !plain {
            return None;
        }
        match base.frozen_weight() {
            FrozenWeight::Dense(w) => {
                Some((FrozenOperand::dense(w), w.dims2().ok()?, w.dtype(), ad))
            }
            FrozenWeight::Quantized(q) if rows >= peft_kernels::GEMM_MIN_ROWS => {
                let (shape, dtype) = (q.shape(), q.dtype());
                // Training only: inference (prefill) keeps the transient dequantized weight
                // rather than building ~2.25 bytes per weight it would use once.
                if let Some(products) = training.then(|| self.int8_products(q)).flatten() {
                    return Some((FrozenOperand::int8(products), shape, dtype, ad));
                }
                let q = Arc::clone(q);
                let dense = FrozenOperand::on_demand(move || {
                    q.dequantize()
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                });
                Some((dense, shape, dtype, ad))
            }
            FrozenWeight::Quantized(_) => None,
        }
    }

    /// The quantized base for the integer GEMM, where it applies: f32 on a CPU where it is
    /// faster (`peft_kernels::q8_gemm::integer_products`), dimensions in whole blocks. Built
    /// once from the dequantized weight (8-bit blocks twice over, about 2.25 bytes per weight:
    /// the price of training at integer speed) and kept until the base changes.
    fn int8_products(&self, q: &Arc<dyn QuantizedWeight>) -> Option<Arc<Int8Products>> {
        let (out, inp) = q.shape();
        if !(peft_kernels::q8_gemm::integer_products()
            && q.dtype() == DType::F32
            && q.device().is_cpu()
            && Int8Products::fits(out, inp))
        {
            return None;
        }
        let mut cache = self.int8.lock().expect("not poisoned");
        if let Some((base, p)) = cache.as_ref() {
            if std::ptr::addr_eq(base.as_ptr(), Arc::as_ptr(q)) {
                return Some(Arc::clone(p));
            }
        }
        // A base that cannot be dequantized keeps the other path, which reports the error.
        let dense = q
            .dequantize()
            .ok()?
            .flatten_all()
            .ok()?
            .to_vec1::<f32>()
            .ok()?;
        let products = Arc::new(Int8Products::new(&dense, out, inp).ok()?);
        *cache = Some((Arc::downgrade(q), Arc::clone(&products)));
        Some(products)
    }

    /// Whether this layer holds its base as integer products (see `int8_products`).
    pub fn holds_integer_products(&self) -> bool {
        self.int8.lock().expect("not poisoned").is_some()
    }

    /// Drops the integer products of a quantized base (rebuilt at the next training batch).
    pub fn release_integer_products(&self) {
        *self.int8.lock().expect("not poisoned") = None;
    }

    fn fused_forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let Some((w, dims, dtype, ad)) = self.fusable(rows) else {
            return Ok(None);
        };
        Ok(Some(peft_kernels::lora_linear_with(
            &x.to_dtype(dtype)?,
            w,
            dims,
            ad.a.as_tensor(),
            ad.b.as_tensor(),
            ad.scaling,
        )?))
    }
}

impl Linear for LoraLinear {
    /// Fused where [`Self::fusable`]: `silu(gate) ⊙ up` is recomputed in the backward instead
    /// of kept (see `peft_kernels::swiglu_lora`).
    fn forward_swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let rows = gate.elem_count() / gate.dim(D::Minus1)?.max(1);
        match self.fusable(rows) {
            Some((w, dims, dtype, ad)) if gate.dtype() == dtype && up.dtype() == dtype => {
                Ok(peft_kernels::swiglu_lora_linear_with(
                    gate,
                    up,
                    w,
                    dims,
                    ad.a.as_tensor(),
                    ad.b.as_tensor(),
                    ad.scaling,
                )?)
            }
            _ => self.forward(&peft_kernels::swiglu(gate, up)?),
        }
    }

    fn fused_lora(&self, rows: usize) -> Option<peft_kernels::lora_mlp::LoraProjection> {
        let (w, dims, dtype, ad) = self.fusable(rows)?;
        (dtype == DType::F32 && ad.a.dtype() == DType::F32 && ad.b.dtype() == DType::F32).then(
            || peft_kernels::lora_mlp::LoraProjection {
                w,
                dims,
                a: ad.a.as_tensor().clone(),
                b: ad.b.as_tensor().clone(),
                scale: ad.scaling,
            },
        )
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused_forward(x)? {
            return Ok(y);
        }
        let y = self.base.forward(x)?;
        let Some((active, training)) = self.switch.acting() else {
            return Ok(y);
        };
        if self.merged_adapter() == Some(active.as_str()) {
            return Ok(y);
        }
        let Some(ad) = self.adapters.get(&active) else {
            return Ok(y);
        };
        let x = x.to_dtype(ad.a.dtype())?;
        let x_in = if training && ad.dropout > 0.0 {
            candle_nn::ops::dropout(&x, ad.dropout as f32)?
        } else {
            x
        };
        // `x · Aᵀ · Bᵀ`, differentiable in x, A and B.
        let xa = matmul_t(&x_in, ad.a.as_tensor())?;
        let lora = (matmul_t(&xa, ad.b.as_tensor())? * ad.scaling)?;
        let lora = lora.to_dtype(y.dtype())?;
        match &ad.magnitude {
            None => Ok((y + lora)?),
            Some(m) => {
                // PEFT: result = m / ‖W + s·BA‖ ⊙ (base + lora), the norm detached.
                let scale = (m.as_tensor() / self.row_norms(ad)?)?.to_dtype(y.dtype())?;
                let base_no_bias = match self.base.base().bias() {
                    Some(b) => y.broadcast_sub(b)?,
                    None => y.clone(),
                };
                let scaled = (base_no_bias + lora)?.broadcast_mul(&scale)?;
                Ok(match self.base.base().bias() {
                    Some(b) => scaled.broadcast_add(b)?,
                    None => scaled,
                })
            }
        }
    }

    fn base(&self) -> &FrozenLinear {
        self.base.base()
    }

    fn base_mut(&mut self) -> &mut FrozenLinear {
        self.base.base_mut()
    }
}
