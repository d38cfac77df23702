//! Every projection of the decoder by its Hugging Face module path
//! (`model.layers.3.self_attn.q_proj`, `lm_head`): the registry PEFT methods are applied
//! through, and what a mistyped path is matched against.

use candle_core::{DType, Device, Tensor};

use super::decoder::Model;
use super::linear::{FrozenLinear, Linear};
use crate::error::{Error, Result};

/// The seven projections of a decoder block, by their Hugging Face names.
pub const ATTENTION_PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
pub const MLP_PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

impl Model {
    /// Hugging Face module paths of every linear layer, in checkpoint order
    /// (`model.layers.0.self_attn.q_proj`, …, `lm_head`).
    pub fn linear_paths(&self) -> Vec<String> {
        let mut paths = Vec::with_capacity(self.layers().len() * 7 + 1);
        for i in 0..self.layers().len() {
            paths.extend(
                ATTENTION_PROJECTIONS
                    .iter()
                    .map(|n| format!("model.layers.{i}.self_attn.{n}")),
            );
            paths.extend(
                MLP_PROJECTIONS
                    .iter()
                    .map(|n| format!("model.layers.{i}.mlp.{n}")),
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
        Some(match name {
            "q_proj" => layer.self_attn.q_proj.as_ref(),
            "k_proj" => layer.self_attn.k_proj.as_ref(),
            "v_proj" => layer.self_attn.v_proj.as_ref(),
            "o_proj" => layer.self_attn.o_proj.as_ref(),
            "gate_proj" => layer.mlp.gate_proj.as_ref(),
            "up_proj" => layer.mlp.up_proj.as_ref(),
            "down_proj" => layer.mlp.down_proj.as_ref(),
            _ => return None,
        })
    }

    fn slot_mut(&mut self, path: &str) -> Option<&mut Box<dyn Linear>> {
        let (layer, name) = match parse_linear_path(path)? {
            LinearPath::Head => return Some(self.lm_head_mut()),
            LinearPath::Layer(i, name) => (self.layers_mut().get_mut(i)?, name),
        };
        Some(match name {
            "q_proj" => &mut layer.self_attn.q_proj,
            "k_proj" => &mut layer.self_attn.k_proj,
            "v_proj" => &mut layer.self_attn.v_proj,
            "o_proj" => &mut layer.self_attn.o_proj,
            "gate_proj" => &mut layer.mlp.gate_proj,
            "up_proj" => &mut layer.mlp.up_proj,
            "down_proj" => &mut layer.mlp.down_proj,
            _ => return None,
        })
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
