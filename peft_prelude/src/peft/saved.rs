//! PEFT's `modules_to_save`: whole modules (the output head, the token embeddings) trained as
//! full copies, one per adapter, alongside the adapter; the originals stay frozen and come
//! back when the adapter is switched off.

use std::any::Any;
use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use super::switch::AdapterSwitch;
use crate::error::Result;
use crate::model::decoder::TokenEmbedding;
use crate::model::{FrozenLinear, Linear};
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
