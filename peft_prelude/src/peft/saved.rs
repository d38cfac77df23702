//! PEFT's `modules_to_save`: whole modules (the output head, the token embeddings) trained as
//! full copies, one per adapter, alongside the adapter; the originals stay frozen and come
//! back when the adapter is switched off.

use std::any::Any;
use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use super::inject::{each_linear, each_linear_mut, wrap};
use super::switch::AdapterSwitch;
use crate::error::{Error, Result};
use crate::model::decoder::TokenEmbedding;
use crate::model::{FrozenLinear, Linear, Model};
use peft_kernels::frozen::matmul_t;

/// The output head with trainable copies of its weight.
#[derive(Debug)]
pub struct SavedLinear {
    base: Box<dyn Linear>,
    pub(crate) copies: BTreeMap<String, Var>,
    switch: AdapterSwitch,
}

impl SavedLinear {
    pub fn new(base: Box<dyn Linear>, switch: AdapterSwitch) -> Self {
        SavedLinear {
            base,
            copies: BTreeMap::new(),
            switch,
        }
    }

    /// Adds a trainable copy of the (dequantized) base weight for `adapter`.
    pub fn add_copy(&mut self, adapter: &str) -> Result<()> {
        let w = self.base.base().dense_weight()?;
        let w = w.to_dtype(super::param_dtype(w.dtype()))?;
        self.copies
            .insert(adapter.to_string(), Var::from_tensor(&w)?);
        Ok(())
    }

    pub fn copy(&self, adapter: &str) -> Option<&Var> {
        self.copies.get(adapter)
    }

    pub fn into_base(self) -> Box<dyn Linear> {
        self.base
    }
}

impl Linear for SavedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let acting = self
            .switch
            .acting()
            .and_then(|(name, _)| self.copies.get(&name));
        let Some(w) = acting else {
            return self.base.forward(x);
        };
        let y = matmul_t(&x.to_dtype(w.dtype())?, w.as_tensor())?;
        Ok(y.to_dtype(x.dtype())?)
    }

    fn base(&self) -> &FrozenLinear {
        self.base.base()
    }

    fn base_mut(&mut self) -> &mut FrozenLinear {
        self.base.base_mut()
    }
}

/// Trainable copies of the token-embedding table, by adapter.
#[derive(Debug)]
pub struct SavedEmbedding {
    pub(crate) copies: BTreeMap<String, Var>,
    switch: AdapterSwitch,
}

impl SavedEmbedding {
    pub fn new(switch: AdapterSwitch) -> Self {
        SavedEmbedding {
            copies: BTreeMap::new(),
            switch,
        }
    }

    pub fn add_copy(&mut self, adapter: &str, table: &Tensor) -> Result<()> {
        let t = table.to_dtype(super::param_dtype(table.dtype()))?;
        self.copies
            .insert(adapter.to_string(), Var::from_tensor(&t)?);
        Ok(())
    }
}

impl TokenEmbedding for SavedEmbedding {
    fn lookup(&self, ids: &Tensor) -> Result<Option<Tensor>> {
        let acting = self
            .switch
            .acting()
            .and_then(|(name, _)| self.copies.get(&name));
        match acting {
            Some(table) => Ok(Some(table.as_tensor().index_select(ids, 0)?)),
            None => Ok(None),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// `modules_to_save`: trainable full copies of the output head and/or the token embeddings
/// for adapter `name`.
pub(crate) fn add(
    model: &mut Model,
    switch: &AdapterSwitch,
    name: &str,
    modules: &[String],
) -> Result<()> {
    for m in modules {
        if m == "lm_head" || m.ends_with(".lm_head") {
            let switch = switch.clone();
            wrap::<SavedLinear>(
                model,
                "lm_head",
                |base| SavedLinear::new(base, switch),
                |l| l.add_copy(name),
            )?;
        } else if m == "embed_tokens" || m.ends_with(".embed_tokens") {
            if model.embed_override().is_none() {
                let saved = SavedEmbedding::new(switch.clone());
                model.set_embed_override(Some(Box::new(saved)));
            }
            let table = model.embed_tokens().clone();
            let saved = model
                .embed_override_mut()
                .and_then(|o| o.as_any_mut().downcast_mut::<SavedEmbedding>())
                .ok_or_else(|| {
                    Error::InvalidArgument("the embedding is replaced by something else".into())
                })?;
            saved.add_copy(name, &table)?;
        } else {
            return Err(Error::UnknownModule {
                name: m.clone(),
                close_matches: vec!["lm_head".into(), "embed_tokens".into()],
            });
        }
    }
    Ok(())
}

/// Adapter `adapter`'s trainable copies under PEFT's saved names.
pub(crate) fn named_vars(model: &Model, adapter: &str) -> Vec<(String, Var)> {
    let mut vars = vec![];
    for (_, l) in each_linear::<SavedLinear>(model) {
        if let Some(w) = l.copy(adapter) {
            vars.push(("base_model.model.lm_head.weight".to_string(), w.clone()));
        }
    }
    let embedding = model
        .embed_override()
        .and_then(|o| o.as_any().downcast_ref::<SavedEmbedding>());
    if let Some(t) = embedding.and_then(|e| e.copies.get(adapter)) {
        let name = "base_model.model.model.embed_tokens.weight".to_string();
        vars.push((name, t.clone()));
    }
    vars
}

/// Removes adapter `name`'s copies.
pub(crate) fn remove(model: &mut Model, name: &str) {
    let _ = each_linear_mut::<SavedLinear>(model, |_, l| {
        l.copies.remove(name);
        Ok(())
    });
    if let Some(e) = model
        .embed_override_mut()
        .and_then(|o| o.as_any_mut().downcast_mut::<SavedEmbedding>())
    {
        e.copies.remove(name);
    }
}
