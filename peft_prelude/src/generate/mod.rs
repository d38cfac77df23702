//! Text generation: KV-cached decoding of one or more prompts with greedy or sampled tokens,
//! stopping at EOS ids or stop strings, and streamers that receive text as it is produced.

pub mod config;
pub mod sampling;

use std::io::Write;
use std::time::Instant;

use candle_core::{DType, Tensor};

pub use crate::rng::Rng;
pub use config::GenerationConfig;

use crate::error::{Error, Result};
use crate::model::{CausalLm, Forward};
use crate::tokenizer::{ChatMessage, TokenStream, Tokenizer};

/// Receives generated text piece by piece (never a split UTF-8 character).
pub trait Streamer {
    fn put(&mut self, text: &str);
    fn end(&mut self) {}
}

/// Prints to stdout as text arrives (what a script or a plain REPL wants). Inside the notebook
/// kernel the text goes out as stream records, so tokens show before a newline arrives.
#[derive(Debug, Default)]
pub struct StdoutStreamer;

impl Streamer for StdoutStreamer {
    fn put(&mut self, text: &str) {
        if crate::notebook::in_kernel() {
            return crate::notebook::print_stream(text);
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    fn end(&mut self) {
        println!();
    }
}

impl<F: FnMut(&str)> Streamer for F {
    fn put(&mut self, text: &str) {
        self(text)
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    StopString,
    MaxNewTokens,
    /// The caller's stop check said so (a notebook interrupt).
    Stopped,
}

/// What [`generate`] returns, one entry per prompt.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens (EOS excluded).
    pub token_ids: Vec<Vec<u32>>,
    /// The new text (special tokens skipped, cut before a stop string).
    pub texts: Vec<String>,
    pub finish_reasons: Vec<FinishReason>,
    pub prompt_tokens: usize,
    /// New tokens over all prompts.
    pub new_tokens: usize,
    pub seconds: f64,
}

impl Generation {
    /// New tokens per second of decoding (prefill included).
    pub fn tokens_per_second(&self) -> f64 {
        self.new_tokens as f64 / self.seconds.max(1e-9)
    }

    pub fn text(&self) -> &str {
        self.texts.first().map(String::as_str).unwrap_or("")
    }
}

/// Optional hooks of a generation run.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Receives the text of the first (or only) sequence as it is produced.
    pub streamer: Option<&'a mut dyn Streamer>,
    /// Checked before each new token; `true` ends generation early, keeping what was produced.
    pub should_stop: Option<&'a dyn Fn() -> bool>,
}

/// Generates a continuation of `prompt` (special tokens such as BOS added as the tokenizer
/// does), streaming it to `streamer` when given. `model` is any [`CausalLm`]: a base
/// [`Model`](crate::model::Model) or a [`PeftModel`](crate::peft::PeftModel) with its adapter
/// acting (prompt methods included).
pub fn generate(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompt: &str,
    config: &GenerationConfig,
    streamer: Option<&mut dyn Streamer>,
) -> Result<Generation> {
    let ids = tokenizer.encode(prompt, true)?;
    generate_ids(
        model,
        tokenizer,
        &[ids],
        config,
        Hooks {
            streamer,
            should_stop: None,
        },
    )
}

/// Generates for several prompts at once (left-padded into one batch).
pub fn generate_batch(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[&str],
    config: &GenerationConfig,
) -> Result<Generation> {
    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode(p, true))
        .collect::<Result<Vec<_>>>()?;
    generate_ids(model, tokenizer, &ids, config, Hooks::default())
}

/// Answers a conversation: applies the tokenizer's chat template with a generation prompt.
pub fn chat(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    config: &GenerationConfig,
    streamer: Option<&mut dyn Streamer>,
) -> Result<Generation> {
    let text = tokenizer.apply_chat_template(messages, true)?;
    // The template writes any BOS itself.
    let ids = tokenizer.encode(&text, false)?;
    generate_ids(
        model,
        tokenizer,
        &[ids],
        config,
        Hooks {
            streamer,
            should_stop: None,
        },
    )
}

/// The decoding loop over already-tokenized prompts.
pub fn generate_ids(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    mut hooks: Hooks<'_>,
) -> Result<Generation> {
    let config = config.clone().validated()?;
    if prompts.is_empty() {
        return Err(Error::InvalidArgument("no prompt to generate from".into()));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "prompt {i} is empty (it needs at least one token, e.g. BOS)"
        )));
    }
    let vocab = model.config().vocab_size as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "prompt token id {bad} is outside the model's vocabulary ({vocab})"
        )));
    }
    let start = Instant::now();
    let device = model.device();
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pad = config
        .pad_token_id
        .or(config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let mut rng = Rng::new(config.seed);
    let mut cache = model.new_cache();

    // Prefill: left-pad so that every row's last prompt token is in the last column.
    let mut ids = Vec::with_capacity(batch * longest);
    let mut mask = Vec::with_capacity(batch * longest);
    let mut positions = Vec::with_capacity(batch * longest);
    for p in prompts {
        let padding = longest - p.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, padding).chain(std::iter::repeat_n(1, p.len())));
        positions.extend(std::iter::repeat_n(0u32, padding).chain(0..p.len() as u32));
    }
    let padded = prompts.iter().any(|p| p.len() != longest);
    let ids_t = Tensor::from_vec(ids, (batch, longest), device)?;
    let mask_t = Tensor::from_vec(mask, (batch, longest), device)?;
    let pos_t = Tensor::from_vec(positions, (batch, longest), device)?;
    let mut args = Forward::ids(&ids_t).with_cache(&mut cache);
    if padded {
        args = args.with_attention_mask(&mask_t).with_position_ids(&pos_t);
    }
    let mut logits = model.last_logits(args)?;

    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut seen: Vec<Vec<u32>> = prompts.to_vec();
    let mut new_ids: Vec<Vec<u32>> = vec![vec![]; batch];
    let mut finish: Vec<Option<FinishReason>> = vec![None; batch];
    // Each stream continues its prompt, so a leading "▁" decodes as the space it is.
    let mut streams: Vec<TokenStream> = prompts
        .iter()
        .map(|p| TokenStream::with_context(tokenizer, p, true))
        .collect();
    let mut texts: Vec<String> = vec![String::new(); batch];
    let max_stop = config
        .stop_strings
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0);

    for _step in 0..config.max_new_tokens {
        // A notebook interrupt stops generation like the caller's own check does.
        if hooks.should_stop.is_some_and(|stop| stop()) || crate::notebook::interrupted() {
            for f in finish.iter_mut().filter(|f| f.is_none()) {
                *f = Some(FinishReason::Stopped);
            }
            break;
        }
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut step_tokens = Vec::with_capacity(batch);
        for (b, mut row) in rows.into_iter().enumerate() {
            if finish[b].is_some() {
                step_tokens.push(pad);
                continue;
            }
            let token = sampling::sample(&mut row, &seen[b], &config, &mut rng);
            step_tokens.push(token);
            seen[b].push(token);
            if config.eos_token_ids.contains(&token) {
                finish[b] = Some(FinishReason::Eos);
                continue;
            }
            new_ids[b].push(token);
            if let Some(piece) = streams[b].push(token)? {
                let before = texts[b].len();
                texts[b].push_str(&piece);
                // Search only where a stop string could newly end.
                let from = before.saturating_sub(max_stop);
                let from = (0..=from)
                    .rev()
                    .find(|&i| texts[b].is_char_boundary(i))
                    .unwrap_or(0);
                let hit = config
                    .stop_strings
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| texts[b][from..].find(s.as_str()).map(|i| from + i))
                    .min();
                let emit_end = hit.unwrap_or(texts[b].len());
                if b == 0 && batch == 1 && emit_end > before {
                    if let Some(s) = hooks.streamer.as_deref_mut() {
                        s.put(&texts[b][before..emit_end]);
                    }
                }
                if let Some(cut) = hit {
                    texts[b].truncate(cut);
                    finish[b] = Some(FinishReason::StopString);
                }
            }
        }
        if finish.iter().all(Option::is_some) {
            break;
        }
        let next = Tensor::from_vec(step_tokens, (batch, 1), device)?;
        let pos = Tensor::from_vec(next_pos.clone(), (batch, 1), device)?;
        next_pos.iter_mut().for_each(|p| *p += 1);
        let mut args = Forward::ids(&next).with_cache(&mut cache);
        if padded {
            args = args.with_position_ids(&pos);
        }
        logits = model.last_logits(args)?;
    }

    // Text still held back by the streams (e.g. an incomplete character at the very end).
    for b in 0..batch {
        if finish[b] == Some(FinishReason::StopString) {
            continue;
        }
        if let Some(rest) = streams[b].finish()? {
            let before = texts[b].len();
            texts[b].push_str(&rest);
            if b == 0 && batch == 1 {
                if let Some(s) = hooks.streamer.as_deref_mut() {
                    s.put(&texts[b][before..]);
                }
            }
        }
    }
    if let Some(s) = hooks.streamer.as_deref_mut() {
        s.end();
    }
    let new_tokens = new_ids.iter().map(Vec::len).sum();
    Ok(Generation {
        finish_reasons: finish
            .into_iter()
            .map(|f| f.unwrap_or(FinishReason::MaxNewTokens))
            .collect(),
        token_ids: new_ids,
        texts,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        new_tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The log-probability the model gives `completion` after `prompt` (the sum over the
/// completion's tokens): how much it prefers one answer over another.
pub fn completion_logprob(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompt: &str,
    completion: &str,
) -> Result<f64> {
    let prompt_ids = tokenizer.encode(prompt, true)?;
    let completion_ids = tokenizer.encode(completion, false)?;
    if prompt_ids.is_empty() || completion_ids.is_empty() {
        return Err(Error::InvalidArgument(
            "prompt and completion must both have tokens".into(),
        ));
    }
    let ids: Vec<u32> = prompt_ids.iter().chain(&completion_ids).copied().collect();
    let mask: Vec<u8> = std::iter::repeat_n(0u8, prompt_ids.len())
        .chain(std::iter::repeat_n(1, completion_ids.len()))
        .collect();
    let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let logits = model.logits(Forward::ids(&input))?.detach();
    let lp = crate::train::dpo::sequence_logps(&logits, &[ids], &[mask])?;
    Ok(lp.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
}
