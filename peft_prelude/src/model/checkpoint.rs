//! A forward pass run one layer at a time for the backward that follows it: each layer either
//! keeps its graph (freed as soon as its gradients are out, where candle's own backward keeps
//! every activation until it returns) or keeps only its input and is recomputed in the
//! backward (gradient checkpointing).

use candle_core::{Tensor, Var};

use super::decoder::{Model, Pass};
use super::forward::Forward;
use crate::error::{Error, Result};

/// Which layers a layer-by-layer forward recomputes in the backward (keeping only their
/// input) instead of keeping their graph (freed layer by layer during the backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// Every layer keeps its graph: no recomputation, the most memory.
    #[default]
    Off,
    /// Every layer is recomputed: one layer's activations at a time, one extra forward.
    All,
    /// The first `n` layers are recomputed, the others kept: memory and time in between,
    /// about `n / layers` of the way from `Off` to `All` (the first layers' graphs are the
    /// ones that would be kept longest).
    FirstLayers(usize),
}

impl From<bool> for Checkpointing {
    fn from(on: bool) -> Self {
        if on {
            Checkpointing::All
        } else {
            Checkpointing::Off
        }
    }
}

impl Checkpointing {
    fn recomputes(self, layer: usize) -> bool {
        match self {
            Checkpointing::Off => false,
            Checkpointing::All => true,
            Checkpointing::FirstLayers(n) => layer < n,
        }
    }
}

/// A forward pass that kept only each layer's input (see [`Model::hidden_states_layered`]).
pub struct Checkpointed {
    /// Final-norm hidden states `[batch, seq, hidden]`; their graph starts at the last
    /// layer's output.
    pub hidden: Tensor,
    top: Var,
    /// The embedded input, with its graph (prompt or embedding adapters get gradients).
    embedded: Tensor,
    inputs: Vec<Tensor>,
    /// For each layer whose graph was kept: its input leaf and output, with its graph.
    kept: Vec<Option<(Var, Tensor)>>,
    pass: Pass,
}

/// A leaf of the next layer's graph holding `x`'s values. A spare `x` (see
/// [`Model::hidden_states_layered`]) that owns a whole f32 buffer on the CPU hands it over:
/// `x` and every tensor sharing its storage are left empty, and the layer's activations are
/// not kept twice (SmolLM2, 1,024 tokens: 2.4 MB per layer). Anything else is copied.
fn leaf_of(x: &Tensor, spare: bool) -> Result<Var> {
    if spare {
        if let Some(values) = peft_kernels::frozen::take_f32_values(x)? {
            return Ok(Var::from_vec(values, x.shape(), x.device())?);
        }
    }
    Ok(Var::from_tensor(x)?)
}

impl Model {
    /// Final-norm hidden states with gradient checkpointing: each layer runs without keeping
    /// its activations (only its input, `[batch, seq, hidden]`, is kept), and
    /// [`backward_checkpointed`](Self::backward_checkpointed) recomputes them one layer at a
    /// time. Peak memory drops from every layer's activations to one layer's, for one extra
    /// forward pass. Not with a KV cache.
    pub fn hidden_states_checkpointed(&self, args: Forward<'_>) -> Result<Checkpointed> {
        self.hidden_states_layered(args, Checkpointing::All)
    }

    /// Final-norm hidden states with one graph per layer, for
    /// [`backward_checkpointed`](Self::backward_checkpointed): nothing is recomputed, but
    /// each layer's activations are freed as soon as its backward is done, instead of all of
    /// them at the end (candle's backward keeps the whole graph alive until it returns).
    pub fn hidden_states_segmented(&self, args: Forward<'_>) -> Result<Checkpointed> {
        self.hidden_states_layered(args, Checkpointing::Off)
    }

    /// The layer-by-layer forward for
    /// [`backward_checkpointed`](Self::backward_checkpointed), recomputing the layers
    /// `checkpointing` names and keeping the others' graphs.
    pub fn hidden_states_layered(
        &self,
        args: Forward<'_>,
        checkpointing: Checkpointing,
    ) -> Result<Checkpointed> {
        let pass = self.prepare(args)?;
        if pass.cache.is_some() {
            return Err(Error::InvalidArgument(
                "gradient checkpointing cannot be combined with a KV cache".into(),
            ));
        }
        let (embedded, pass) = (pass.x, pass.pass);
        let mut inputs = Vec::with_capacity(self.layers().len());
        let mut kept = Vec::with_capacity(self.layers().len());
        let mut x = embedded.detach();
        // Whether `x`'s values are read by nothing after this loop (a layer's output: only
        // the root of its kept graph holds it, and that root's values are never read again),
        // so the next leaf may take them over instead of copying them.
        let mut x_is_spare = false;
        for (i, layer) in self.layers().iter().enumerate() {
            x = if checkpointing.recomputes(i) {
                inputs.push(x.clone());
                // The graph built here is dropped with `detach`: only the output is kept.
                kept.push(None);
                layer.forward(&x, &pass, None)?.detach()
            } else {
                let leaf = leaf_of(&x, x_is_spare)?;
                inputs.push(leaf.as_tensor().detach());
                let y = layer.forward(leaf.as_tensor(), &pass, None)?;
                let next = y.detach();
                kept.push(Some((leaf, y)));
                next
            };
            x_is_spare = true;
        }
        let top = leaf_of(&x, x_is_spare)?;
        let hidden = self.final_norm().forward(top.as_tensor())?;
        Ok(Checkpointed {
            hidden,
            top,
            embedded,
            inputs,
            kept,
            pass,
        })
    }

    /// The gradients of `loss` (a scalar computed from `ck.hidden`) for `vars`, recomputing
    /// every checkpointed layer's activations from its kept input, last layer first. `loss`
    /// is taken so that the head's graph (the final norm, the loss's saved gradient) is freed
    /// before the layers' backward, where the step's memory peaks.
    pub fn backward_checkpointed(
        &self,
        ck: Checkpointed,
        loss: Tensor,
        vars: &[Var],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        // Detached as they are gathered, or every recomputed layer would stay alive and the
        // next layer's backward would walk through it again.
        let add = |grads: &mut Vec<Option<Tensor>>, store: &candle_core::backprop::GradStore| {
            crate::grads::accumulate(grads, vars, store)
        };
        let top = loss.backward()?;
        drop(loss);
        add(&mut grads, &top)?;
        let Some(mut g) = top.get(ck.top.as_tensor()).map(Tensor::detach) else {
            return Ok(grads);
        };
        drop((top, ck.top, ck.hidden));
        let mut kept = ck.kept;
        for (i, input) in ck.inputs.iter().enumerate().rev() {
            let (x, y) = match kept.get_mut(i).and_then(Option::take) {
                // This layer's graph was kept; it is dropped after its backward.
                Some(pair) => pair,
                None => {
                    let x = Var::from_tensor(input)?;
                    let y = self.layers()[i].forward(x.as_tensor(), &ck.pass, None)?;
                    (x, y)
                }
            };
            // The layer's backward with the incoming gradient, from a root whose gradient for
            // `y` is `g` (as sum(y ⊙ g) would be, without reading `y`: its values may have
            // moved to the next layer's leaf).
            let g_in = g.clone();
            let root = peft_kernels::frozen::reattach(
                &y,
                Tensor::zeros((), y.dtype(), y.device())?,
                move |_| Ok(g_in.clone()),
            )?;
            let store = root.backward()?;
            add(&mut grads, &store)?;
            g = store
                .get(x.as_tensor())
                .map(Tensor::detach)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("layer {i}: no gradient reached its input"))
                })?;
        }
        if ck.embedded.track_op() {
            let store = (&ck.embedded * &g)?.sum_all()?.backward()?;
            add(&mut grads, &store)?;
        }
        Ok(grads)
    }
}
