//! Gradients of trainable parameters, gathered from backward passes and summed (over
//! micro-batches, over the layers of a checkpointed backward), one slot per parameter.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

/// Adds the gradients `store` holds for `params` into `grads` (slot `i` for `params[i]`).
/// Detached: candle keeps a leaf's gradient attached to the graph that made it, and with it
/// every activation of that graph, for as long as the gradient lives.
pub fn accumulate(grads: &mut [Option<Tensor>], params: &[Var], store: &GradStore) -> Result<()> {
    for (slot, var) in grads.iter_mut().zip(params) {
        if let Some(g) = store.get(var.as_tensor()) {
            add_one(slot, g.detach())?;
        }
    }
    Ok(())
}

/// Adds `new` into `grads`, slot by slot (`None`: nothing arrived for that parameter).
pub fn add(grads: &mut [Option<Tensor>], new: Vec<Option<Tensor>>) -> Result<()> {
    for (slot, g) in grads.iter_mut().zip(new) {
        if let Some(g) = g {
            add_one(slot, g)?;
        }
    }
    Ok(())
}

fn add_one(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(acc) => (acc + g)?.detach(),
        None => g,
    });
    Ok(())
}
