//! IA³: learned vectors that rescale a frozen projection's output (`y = W x ⊙ l`) or, for
//! feed-forward modules, its input (`y = W (x ⊙ l)`).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::config::Ia3Config;
use super::inject::{each_linear, each_linear_mut, target_paths, wrap};
use super::switch::AdapterSwitch;
use super::targets::{default_targets, DefaultFor, Matcher};
use crate::error::{Error, Result};
use crate::model::{FrozenLinear, Linear, Model};

#[derive(Debug)]
pub struct Ia3Linear {
    base: Box<dyn Linear>,
    /// `ia3_l`: `[out, 1]` (output scaling) or `[1, in]` (feed-forward, input scaling).
    adapters: BTreeMap<String, Var>,
    feedforward: bool,
    switch: AdapterSwitch,
    merged: Option<String>,
}

impl Ia3Linear {
    pub fn new(base: Box<dyn Linear>, feedforward: bool, switch: AdapterSwitch) -> Self {
        Ia3Linear {
            base,
            adapters: BTreeMap::new(),
            feedforward,
            switch,
            merged: None,
        }
    }

    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }

    /// The shape PEFT gives `ia3_l` for this layer.
    pub fn vector_shape(&self) -> (usize, usize) {
        if self.feedforward {
            (1, self.base.in_features())
        } else {
            (self.base.out_features(), 1)
        }
    }

    /// Adds an adapter initialised to ones (a no-op).
    pub fn add_adapter(&mut self, name: &str) -> Result<()> {
        let device = self.base.base().device();
        let dtype = super::param_dtype(self.base.base().dtype());
        let l = Var::ones(self.vector_shape(), dtype, &device)?;
        self.adapters.insert(name.to_string(), l);
        Ok(())
    }

    pub fn adapters(&self) -> &BTreeMap<String, Var> {
        &self.adapters
    }

    pub fn remove_adapter(&mut self, name: &str) -> Option<Var> {
        self.adapters.remove(name)
    }

    pub fn into_base(self) -> Box<dyn Linear> {
        self.base
    }

    /// The vector as a broadcastable row over the scaled dimension of W: `[out, 1]` scales
    /// rows, `[1, in]` scales columns — exactly its saved shape.
    fn scale_weight(&mut self, name: &str, invert: bool) -> Result<()> {
        let l = self
            .adapters
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("no IA3 adapter named `{name}`")))?
            .as_tensor()
            .detach();
        let w = self.base.base().dense_weight()?;
        let l = l.to_dtype(DType::F32)?;
        let w32 = w.to_dtype(DType::F32)?;
        let new_w = if invert {
            w32.broadcast_div(&(l + 1e-8)?)?
        } else {
            w32.broadcast_mul(&l)?
        };
        self.base.base_mut().set_weight(new_w.to_dtype(w.dtype())?)
    }

    /// The base weight scaled by adapter `name`, in f32, without changing the layer.
    pub fn merged_weight(&self, name: &str) -> Result<Tensor> {
        let w = self.base.base().dense_weight()?.to_dtype(DType::F32)?;
        if self.merged.as_deref() == Some(name) {
            return Ok(w);
        }
        let l = self
            .adapters
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("no IA3 adapter named `{name}`")))?
            .as_tensor()
            .detach()
            .to_dtype(DType::F32)?;
        Ok(w.broadcast_mul(&l)?)
    }

    pub fn merge(&mut self, name: &str) -> Result<()> {
        if self.merged.is_some() {
            return Err(Error::InvalidArgument(
                "an adapter is already merged; unmerge it first".into(),
            ));
        }
        self.scale_weight(name, false)?;
        self.merged = Some(name.to_string());
        Ok(())
    }

    pub fn unmerge(&mut self) -> Result<()> {
        if let Some(name) = self.merged.take() {
            self.scale_weight(&name, true)?;
        }
        Ok(())
    }

    pub fn merged_adapter(&self) -> Option<&str> {
        self.merged.as_deref()
    }
}

impl Linear for Ia3Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let acting = self
            .switch
            .acting()
            .filter(|(name, _)| self.merged.as_deref() != Some(name.as_str()))
            .and_then(|(name, _)| self.adapters.get(&name));
        let Some(l) = acting else {
            return self.base.forward(x);
        };
        if self.feedforward {
            let l = l.as_tensor().squeeze(0)?.to_dtype(x.dtype())?;
            self.base.forward(&x.broadcast_mul(&l)?)
        } else {
            let y = self.base.forward(x)?;
            let l = l.as_tensor().squeeze(1)?.to_dtype(y.dtype())?;
            Ok(y.broadcast_mul(&l)?)
        }
    }

    fn base(&self) -> &FrozenLinear {
        self.base.base()
    }

    fn base_mut(&mut self) -> &mut FrozenLinear {
        self.base.base_mut()
    }
}

/// Adds IA3 adapter `name` to every projection `c` targets (wrapping it in an [`Ia3Linear`]
/// the first time). `modules_to_save` is the caller's.
pub(crate) fn add(
    model: &mut Model,
    switch: &AdapterSwitch,
    name: &str,
    c: &Ia3Config,
) -> Result<()> {
    let arch = model.config().architecture;
    let targets = match &c.target_modules {
        Some(t) => t.clone(),
        None => default_targets(DefaultFor::Ia3, arch)?,
    };
    let feedforward = match &c.feedforward_modules {
        Some(t) => t.clone(),
        None => default_targets(DefaultFor::Ia3Feedforward, arch)?,
    };
    let ff = Matcher::new(&feedforward)?;
    let paths = target_paths(model, &targets, c.exclude_modules.as_ref(), None)?;
    for path in paths {
        let is_ff = ff.matches(&path);
        let switch = switch.clone();
        wrap::<Ia3Linear>(
            model,
            &path,
            |base| Ia3Linear::new(base, is_ff, switch),
            |l| {
                if l.is_feedforward() != is_ff {
                    return Err(Error::Config(format!(
                        "{path} is a feed-forward module in one IA3 adapter and not in another"
                    )));
                }
                l.add_adapter(name)
            },
        )?;
    }
    Ok(())
}

/// Adapter `adapter`'s vectors under PEFT's saved names (`….k_proj.ia3_l`).
pub(crate) fn named_vars(model: &Model, adapter: &str) -> Vec<(String, Var)> {
    each_linear::<Ia3Linear>(model)
        .into_iter()
        .filter_map(|(path, l)| {
            let v = l.adapters().get(adapter)?;
            Some((format!("base_model.model.{path}.ia3_l"), v.clone()))
        })
        .collect()
}

/// Removes adapter `name` from every IA3 layer.
pub(crate) fn remove(model: &mut Model, name: &str) {
    let _ = each_linear_mut::<Ia3Linear>(model, |_, l| {
        l.remove_adapter(name);
        Ok(())
    });
}
