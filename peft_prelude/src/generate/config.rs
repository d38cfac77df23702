//! Generation settings with Hugging Face's names (`generation_config.json`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// `false`: greedy decoding (temperature, top-k and top-p are ignored).
    pub do_sample: bool,
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f64,
    /// 1.0 disables the penalty (CTRL-style, as transformers applies it).
    pub repetition_penalty: f64,
    /// Generation stops when one of these is produced (it is not part of the returned text).
    pub eos_token_ids: Vec<u32>,
    /// Generation stops when the text contains one of these (the text is cut before it).
    pub stop_strings: Vec<String>,
    /// Left padding for batches of prompts of different lengths.
    pub pad_token_id: Option<u32>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            eos_token_ids: vec![],
            stop_strings: vec![],
            pad_token_id: None,
            seed: 0,
        }
    }
}

/// `generation_config.json` keys we honour.
#[derive(Debug, Deserialize)]
struct GenerationConfigJson {
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    repetition_penalty: Option<f64>,
    max_new_tokens: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl GenerationConfig {
    /// Defaults for a model: its EOS ids (config, tokenizer), overridden by
    /// `generation_config.json` when given.
    pub fn for_model(
        config: &ModelConfig,
        tokenizer: &Tokenizer,
        json: Option<&Path>,
    ) -> Result<Self> {
        let mut g = GenerationConfig {
            eos_token_ids: config.eos_token_id.clone(),
            ..Default::default()
        };
        if let Some(eos) = tokenizer.eos_token_id() {
            if !g.eos_token_ids.contains(&eos) {
                g.eos_token_ids.push(eos);
            }
        }
        if let Some(path) = json {
            let raw: GenerationConfigJson = read_json(path)?;
            if let Some(eos) = raw.eos_token_id {
                g.eos_token_ids = match eos {
                    OneOrMany::One(id) => vec![id],
                    OneOrMany::Many(ids) => ids,
                };
            }
            g.pad_token_id = raw.pad_token_id.or(g.pad_token_id);
            g.do_sample = raw.do_sample.unwrap_or(g.do_sample);
            g.temperature = raw.temperature.unwrap_or(g.temperature);
            g.top_k = raw.top_k.unwrap_or(g.top_k);
            g.top_p = raw.top_p.unwrap_or(g.top_p);
            g.repetition_penalty = raw.repetition_penalty.unwrap_or(g.repetition_penalty);
            g.max_new_tokens = raw.max_new_tokens.unwrap_or(g.max_new_tokens);
        }
        g.validated()
    }

    /// Greedy decoding of at most `n` new tokens.
    pub fn greedy(mut self, max_new_tokens: usize) -> Self {
        self.do_sample = false;
        self.max_new_tokens = max_new_tokens;
        self
    }

    pub fn validated(self) -> Result<Self> {
        let bad = |what: String| Err(Error::Config(format!("generation: {what}")));
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be > 0 when sampling, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(self)
    }
}
