//! The state every adapter layer of one PeftModel shares: which adapter is active, whether
//! adapters are enabled at all (the DPO reference model is the same model with them off),
//! and whether we are training (dropout on).

use std::sync::{Arc, RwLock};

#[derive(Debug, Clone)]
pub struct SwitchState {
    pub active: String,
    pub enabled: bool,
    pub training: bool,
}

/// Cheap to clone; all clones see the same state.
#[derive(Debug, Clone)]
pub struct AdapterSwitch(Arc<RwLock<SwitchState>>);

impl AdapterSwitch {
    pub fn new(active: &str) -> Self {
        AdapterSwitch(Arc::new(RwLock::new(SwitchState {
            active: active.to_string(),
            enabled: true,
            training: false,
        })))
    }

    pub fn get(&self) -> SwitchState {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut SwitchState)) {
        f(&mut self.0.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// The adapter that should act now, if any.
    pub fn acting(&self) -> Option<(String, bool)> {
        let s = self.get();
        s.enabled.then_some((s.active, s.training))
    }
}
