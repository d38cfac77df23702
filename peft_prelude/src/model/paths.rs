//! Every projection of the decoder by its Hugging Face module path
//! (`model.layers.3.self_attn.q_proj`, `lm_head`): the registry PEFT methods are applied
//! through, and what a mistyped path is matched against.

use candle_core::{DType, Device, Tensor};

use super::decoder::Model;
use super::linear::{FrozenLinear, Linear};
use crate::error::{Error, Result};

/// The projections of a decoder block, by their Hugging Face names (Phi-3 fuses q, k, v into
/// `qkv_proj` and gate, up into `gate_up_proj`).
pub const ATTENTION_PROJECTIONS: [&str; 5] = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"];
pub const MLP_PROJECTIONS: [&str; 4] = ["gate_proj", "up_proj", "gate_up_proj", "down_proj"];

impl Model {
    /// Hugging Face module paths of every linear layer, in checkpoint order
    /// (`model.layers.0.self_attn.q_proj`, …, `lm_head`).
    pub fn linear_paths(&self) -> Vec<String> {
        let names = self.config().projection_names();
        let mut paths = Vec::with_capacity(self.layers().len() * names.len() + 1);
        for i in 0..self.layers().len() {
            paths.extend(
                names
                    .iter()
                    .map(|(block, name)| format!("model.layers.{i}.{block}.{name}")),
            );
        }
        paths.push("lm_head".to_string());
        paths
    }

    /// The linear layer at a Hugging Face module path.
    pub fn linear(&self, path: &str) -> Result<&dyn Linear> {
        self.slot(path).ok_or_else(|| self.unknown_module(path))
    }

    /// Replaces the linear layer at `path` by `f(old)`; on error the old layer stays.
    pub fn replace_linear(
        &mut self,
        path: &str,
        f: impl FnOnce(
            Box<dyn Linear>,
        ) -> std::result::Result<Box<dyn Linear>, (Box<dyn Linear>, Error)>,
    ) -> Result<()> {
        let err = self.unknown_module(path);
        let slot = self.slot_mut(path).ok_or(err)?;
        let placeholder: Box<dyn Linear> = Box::new(FrozenLinear::new(
            Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?,
            None,
        ));
        let old = std::mem::replace(slot, placeholder);
        match f(old) {
            Ok(new) => {
                *slot = new;
                Ok(())
            }
            Err((old, e)) => {
                *slot = old;
                Err(e)
            }
        }
    }

    fn slot(&self, path: &str) -> Option<&dyn Linear> {
        let (layer, name) = match parse_linear_path(path)? {
            LinearPath::Head => return Some(self.lm_head()),
            LinearPath::Layer(i, name) => (self.layers().get(i)?, name),
        };
        let (a, m) = (&layer.self_attn, &layer.mlp);
        match name {
            "o_proj" => Some(a.o_proj.as_ref()),
            "down_proj" => Some(m.down_proj.as_ref()),
            _ => match Slot::of(name)? {
                Slot::Qkv(i) => a.qkv.slot(i),
                Slot::GateUp(i) => m.gate_up.slot(i),
            },
        }
    }

    fn slot_mut(&mut self, path: &str) -> Option<&mut Box<dyn Linear>> {
        let (layer, name) = match parse_linear_path(path)? {
            LinearPath::Head => return Some(self.lm_head_mut()),
            LinearPath::Layer(i, name) => (self.layers_mut().get_mut(i)?, name),
        };
        let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
        match name {
            "o_proj" => Some(&mut a.o_proj),
            "down_proj" => Some(&mut m.down_proj),
            _ => match Slot::of(name)? {
                Slot::Qkv(i) => a.qkv.slot_mut(i),
                Slot::GateUp(i) => m.gate_up.slot_mut(i),
            },
        }
    }

    /// An `UnknownModule` error listing the paths closest to `path`.
    pub fn unknown_module(&self, path: &str) -> Error {
        let mut scored: Vec<(usize, String)> = self
            .linear_paths()
            .into_iter()
            .map(|p| (edit_distance(path, &p), p))
            .collect();
        scored.sort();
        let best = scored.first().map_or(0, |s| s.0);
        Error::UnknownModule {
            name: path.to_string(),
            close_matches: scored
                .into_iter()
                .take_while(|(d, _)| *d <= best.max(2) && *d <= path.len() / 2 + 1)
                .take(5)
                .map(|(_, p)| p)
                .collect(),
        }
    }
}

/// Where a parallel projection sits: its index among the separate ones, or `None` for the
/// fused one.
enum Slot {
    Qkv(Option<usize>),
    GateUp(Option<usize>),
}

impl Slot {
    fn of(name: &str) -> Option<Slot> {
        Some(match name {
            "q_proj" => Slot::Qkv(Some(0)),
            "k_proj" => Slot::Qkv(Some(1)),
            "v_proj" => Slot::Qkv(Some(2)),
            "qkv_proj" => Slot::Qkv(None),
            "gate_proj" => Slot::GateUp(Some(0)),
            "up_proj" => Slot::GateUp(Some(1)),
            "gate_up_proj" => Slot::GateUp(None),
            _ => return None,
        })
    }
}

enum LinearPath<'a> {
    Head,
    Layer(usize, &'a str),
}

fn parse_linear_path(path: &str) -> Option<LinearPath<'_>> {
    if path == "lm_head" {
        return Some(LinearPath::Head);
    }
    let rest = path.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let name = rest
        .strip_prefix("self_attn.")
        .filter(|n| ATTENTION_PROJECTIONS.contains(n))
        .or_else(|| {
            rest.strip_prefix("mlp.")
                .filter(|n| MLP_PROJECTIONS.contains(n))
        })?;
    Some(LinearPath::Layer(index, name))
}

/// Levenshtein distance (for "did you mean" suggestions).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
