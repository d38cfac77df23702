//! Bottleneck adapters (Houlsby, Pfeiffer, parallel) as block adapters of the decoder:
//! sequential `y = out + s · up(act(down(out)))`, parallel `y = out + s · up(act(down(in)))`.

use std::any::Any;
use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};

use super::config::BottleneckConfig;
use super::prompt::TrainableLinear;
use super::switch::AdapterSwitch;
use crate::error::{Error, Result};
use crate::model::decoder::BlockAdapter;
use crate::model::Model;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NonLinearity {
    Relu,
    Swish,
    Gelu,
    Tanh,
}

impl NonLinearity {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "relu" => NonLinearity::Relu,
            "swish" | "silu" => NonLinearity::Swish,
            "gelu" | "gelu_new" => NonLinearity::Gelu,
            "tanh" => NonLinearity::Tanh,
            other => {
                return Err(Error::Config(format!(
                    "bottleneck non_linearity `{other}` (supported: relu, swish, gelu, tanh)"
                )))
            }
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            NonLinearity::Relu => x.relu()?,
            NonLinearity::Swish => x.silu()?,
            NonLinearity::Gelu => x.gelu_erf()?,
            NonLinearity::Tanh => x.tanh()?,
        })
    }
}

/// One adapter's down/up projections.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    pub down: TrainableLinear,
    pub up: TrainableLinear,
}

/// The adapters of one block position (after attention or after the MLP), by adapter name.
#[derive(Debug)]
pub struct BottleneckBlock {
    adapters: BTreeMap<String, (Bottleneck, NonLinearity, f64, bool)>,
    switch: AdapterSwitch,
}

impl BottleneckBlock {
    pub fn new(switch: AdapterSwitch) -> Self {
        BottleneckBlock {
            adapters: BTreeMap::new(),
            switch,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_adapter(
        &mut self,
        name: &str,
        hidden: usize,
        width: usize,
        act: NonLinearity,
        scaling: f64,
        parallel: bool,
        init: &str,
        dtype: candle_core::DType,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<()> {
        let mut down = TrainableLinear::new(hidden, width, dtype, rng, device)?;
        let mut up = TrainableLinear::new(width, hidden, dtype, rng, device)?;
        match init {
            // AdapterHub's "bert": N(0, 0.01²) weights, zero biases: close to identity.
            "bert" => {
                for l in [&mut down, &mut up] {
                    let (o, i) = l.weight.dims2()?;
                    let w = Tensor::from_vec(rng.normal(o * i, 0.0, 0.01), (o, i), device)?;
                    l.weight = Var::from_tensor(&w.to_dtype(dtype)?)?;
                    l.bias = Var::zeros(o, dtype, device)?;
                }
            }
            // "mam_adapter" (and Houlsby's zero-start): Kaiming down, zero up: exactly identity.
            "mam_adapter" | "houlsby" => {
                let (o, i) = up.weight.dims2()?;
                up.weight = Var::zeros((o, i), dtype, device)?;
                up.bias = Var::zeros(o, dtype, device)?;
            }
            other => {
                return Err(Error::Config(format!(
                    "bottleneck init_weights `{other}` (supported: bert, mam_adapter, houlsby)"
                )))
            }
        }
        self.adapters.insert(
            name.to_string(),
            (Bottleneck { down, up }, act, scaling, parallel),
        );
        Ok(())
    }

    pub fn adapter(&self, name: &str) -> Option<&Bottleneck> {
        self.adapters.get(name).map(|a| &a.0)
    }

    pub fn remove_adapter(&mut self, name: &str) {
        self.adapters.remove(name);
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}

impl BlockAdapter for BottleneckBlock {
    fn forward(&self, input: &Tensor, output: &Tensor) -> Result<Tensor> {
        let Some((active, _)) = self.switch.acting() else {
            return Ok(output.clone());
        };
        let Some((b, act, scaling, parallel)) = self.adapters.get(&active) else {
            return Ok(output.clone());
        };
        let source = if *parallel { input } else { output };
        let h = act.apply(&b.down.forward(source)?)?;
        let delta = (b.up.forward(&h)? * *scaling)?;
        Ok((output + delta.to_dtype(output.dtype())?)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Adds bottleneck adapter `name` after the attention and/or MLP block of every layer `c`
/// does not leave out.
pub(crate) fn add(
    model: &mut Model,
    switch: &AdapterSwitch,
    name: &str,
    c: &BottleneckConfig,
    rng: &mut Rng,
) -> Result<()> {
    if c.reduction_factor == 0 || c.reduction_factor > model.config().hidden_size {
        return Err(Error::Config(format!(
            "reduction_factor must be in 1..={} (hidden_size), got {}",
            model.config().hidden_size,
            c.reduction_factor
        )));
    }
    if !c.mh_adapter && !c.output_adapter {
        return Err(Error::Config(
            "a bottleneck adapter needs mh_adapter or output_adapter".into(),
        ));
    }
    let act = NonLinearity::parse(&c.non_linearity)?;
    let hidden = model.config().hidden_size;
    let width = hidden / c.reduction_factor;
    let device = model.device().clone();
    let dtype = super::param_dtype(model.dtype());
    for (i, layer) in model.layers_mut().iter_mut().enumerate() {
        if c.leave_out.contains(&i) {
            continue;
        }
        let slots = [
            (c.mh_adapter, &mut layer.attn_adapter),
            (c.output_adapter, &mut layer.mlp_adapter),
        ];
        for (wanted, slot) in slots {
            if !wanted {
                continue;
            }
            let block = slot.get_or_insert_with(|| Box::new(BottleneckBlock::new(switch.clone())));
            let block = block
                .as_any_mut()
                .downcast_mut::<BottleneckBlock>()
                .ok_or_else(|| {
                    Error::InvalidArgument("layer has another kind of block adapter".into())
                })?;
            block.add_adapter(
                name,
                hidden,
                width,
                act,
                c.scaling,
                c.is_parallel,
                &c.init_weights,
                dtype,
                rng,
                &device,
            )?;
        }
    }
    Ok(())
}

/// The block adapters of each layer that are bottlenecks, with their PEFT-style names.
fn blocks(model: &Model) -> Vec<(String, &BottleneckBlock)> {
    let mut out = vec![];
    for (i, layer) in model.layers().iter().enumerate() {
        for (slot, name) in [
            (&layer.attn_adapter, "attention_adapter"),
            (&layer.mlp_adapter, "output_adapter"),
        ] {
            if let Some(block) = slot
                .as_ref()
                .and_then(|b| b.as_any().downcast_ref::<BottleneckBlock>())
            {
                out.push((format!("base_model.model.model.layers.{i}.{name}"), block));
            }
        }
    }
    out
}

/// Adapter `adapter`'s projections (`….output_adapter.adapter_down.weight`, …).
pub(crate) fn named_vars(model: &Model, adapter: &str) -> Vec<(String, Var)> {
    let mut vars = vec![];
    for (p, block) in blocks(model) {
        if let Some(b) = block.adapter(adapter) {
            for (part, l) in [("adapter_down", &b.down), ("adapter_up", &b.up)] {
                vars.push((format!("{p}.{part}.weight"), l.weight.clone()));
                vars.push((format!("{p}.{part}.bias"), l.bias.clone()));
            }
        }
    }
    vars
}

/// Removes adapter `name` from every block; `drop_all` takes the blocks out altogether.
pub(crate) fn remove(model: &mut Model, name: &str) {
    for layer in model.layers_mut() {
        for slot in [&mut layer.attn_adapter, &mut layer.mlp_adapter] {
            if let Some(b) = slot
                .as_mut()
                .and_then(|b| b.as_any_mut().downcast_mut::<BottleneckBlock>())
            {
                b.remove_adapter(name);
            }
        }
    }
}
