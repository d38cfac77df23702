//! A tokenizer out again, in the two forms other programs read: a Hugging Face tokenizer
//! directory (`tokenizer.json`, `tokenizer_config.json` with the chat template,
//! `special_tokens_map.json`) and llama.cpp's `tokenizer.*` GGUF metadata.
//!
//! A tokenizer that came from a GGUF keeps that file's metadata (the exact vocabulary, scores
//! and pre-tokenizer name), updated with what can change here (special tokens, chat template).
//! Otherwise the metadata is derived from the `tokenizers` model: byte-level BPE becomes
//! llama.cpp's `gpt2` model with the pre-tokenizer recognised by its regex, SentencePiece-style
//! BPE (byte fallback, `▁` for spaces) becomes `llama` with scores that reproduce the merge
//! order. A pre-tokenizer llama.cpp has no name for is refused rather than written wrongly.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use super::gguf::{REGEX_LLAMA3, REGEX_QWEN2};
use super::Tokenizer;
use crate::error::{Error, Result};
use crate::peft::io::write_atomic;

/// llama.cpp's `llama_token_type`.
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const BYTE: i32 = 6;
}

/// The Llama 3 / Qwen 2 regexes as their `tokenizer.json` files spell them (a case-insensitive
/// group where our copies spell out each case).
const REGEX_LLAMA3_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`,
/// each atomically. transformers' `AutoTokenizer.from_pretrained(dir)` and
/// [`Tokenizer::from_file`] read them back with the same ids and chat template.
pub(super) fn save_pretrained(tok: &Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = tok
        .inner
        .to_string(false)
        .map_err(|e| Error::Tokenizer(format!("cannot serialise tokenizer.json: {e}")))?;
    write_atomic(dir.join("tokenizer.json"), json.as_bytes())?;

    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    config.insert("add_bos_token".into(), tok.add_bos.into());
    config.insert("add_eos_token".into(), tok.adds_eos().into());
    config.insert("clean_up_tokenization_spaces".into(), false.into());
    config.insert(
        "model_max_length".into(),
        json!(1_000_000_000_000_000_000u64),
    );
    let mut special = serde_json::Map::new();
    for (key, token) in [
        ("bos_token", tok.bos_token()),
        ("eos_token", tok.eos_token()),
    ] {
        if let Some(text) = token {
            config.insert(key.into(), text.into());
            special.insert(key.into(), text.into());
        }
    }
    if let Some(unk) = unknown_token(tok) {
        config.insert("unk_token".into(), unk.clone().into());
        special.insert("unk_token".into(), unk.into());
    }
    if let Some(template) = tok.chat_template() {
        config.insert("chat_template".into(), template.into());
    }
    let pretty = |v: &Json| serde_json::to_vec_pretty(v).expect("JSON values serialise");
    write_atomic(
        dir.join("tokenizer_config.json"),
        &pretty(&Json::Object(config)),
    )?;
    write_atomic(
        dir.join("special_tokens_map.json"),
        &pretty(&Json::Object(special)),
    )
}

fn unknown_token(tok: &Tokenizer) -> Option<String> {
    let model = serde_json::to_value(tok.inner.get_model()).ok()?;
    model.get("unk_token")?.as_str().map(str::to_owned)
}

/// The `tokenizer.*` metadata llama.cpp reads, sorted by key.
pub(super) fn gguf_metadata(tok: &Tokenizer) -> Result<Vec<(String, Value)>> {
    let mut md: Vec<(String, Value)> = match &tok.gguf_metadata {
        Some(original) => original.as_ref().clone(),
        None => derive(tok)?,
    };
    // What may have changed since the tokenizer was loaded.
    let mut set = |key: &str, value: Option<Value>| {
        md.retain(|(k, _)| k != key);
        if let Some(v) = value {
            md.push((key.to_string(), v));
        }
    };
    set(
        "tokenizer.ggml.bos_token_id",
        tok.bos_token_id().map(Value::U32),
    );
    set(
        "tokenizer.ggml.eos_token_id",
        tok.eos_token_id().map(Value::U32),
    );
    set(
        "tokenizer.ggml.add_bos_token",
        Some(Value::Bool(tok.add_bos)),
    );
    set(
        "tokenizer.ggml.add_eos_token",
        Some(Value::Bool(tok.adds_eos())),
    );
    set(
        "tokenizer.chat_template",
        tok.chat_template().map(|t| Value::String(t.to_string())),
    );
    md.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(md)
}

/// Metadata from the `tokenizers` model (a tokenizer that did not come from a GGUF).
fn derive(tok: &Tokenizer) -> Result<Vec<(String, Value)>> {
    let unsupported = |what: String| Error::Tokenizer(format!("GGUF export: {what}"));
    let full = serde_json::to_value(&tok.inner)
        .map_err(|e| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
    let model = &full["model"];
    if model["type"] != "BPE" {
        return Err(unsupported(format!(
            "tokenizer model {} (llama.cpp's `llama` and `gpt2` models are BPE)",
            model["type"]
        )));
    }
    let tokens = tokens_by_id(tok)?;
    let added: Vec<(&str, bool)> = full["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((t["content"].as_str()?, t["special"].as_bool()?)))
                .collect()
        })
        .unwrap_or_default();
    let added_type = |text: &str| {
        added.iter().find(|(t, _)| *t == text).map(|(_, special)| {
            if *special {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            }
        })
    };
    let merges = merges_of(model)?;
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut md = vec![];
    if let Some(pre) = byte_level_pre(&full)? {
        let types: Vec<Value> = tokens
            .iter()
            .map(|t| Value::I32(added_type(t).unwrap_or(token_type::NORMAL)))
            .collect();
        md.push((
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ));
        md.push(("tokenizer.ggml.pre".to_string(), Value::String(pre.into())));
        md.push(("tokenizer.ggml.token_type".to_string(), Value::Array(types)));
        md.push((
            "tokenizer.ggml.merges".to_string(),
            strings(merges.iter().map(|(a, b)| format!("{a} {b}")).collect()),
        ));
    } else if model["byte_fallback"] == true {
        let unk = model["unk_token"].as_str();
        let scores = scores_from_merges(&tokens, &merges);
        let types: Vec<Value> = tokens
            .iter()
            .map(|t| {
                Value::I32(if Some(t.as_str()) == unk {
                    token_type::UNKNOWN
                } else if is_byte_piece(t) {
                    token_type::BYTE
                } else {
                    added_type(t).unwrap_or(token_type::NORMAL)
                })
            })
            .collect();
        md.push((
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ));
        md.push((
            "tokenizer.ggml.scores".to_string(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ));
        md.push(("tokenizer.ggml.token_type".to_string(), Value::Array(types)));
        md.push((
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(adds_space_prefix(&full)),
        ));
        if let Some(id) = unk.and_then(|u| tok.token_to_id(u)) {
            md.push((
                "tokenizer.ggml.unknown_token_id".to_string(),
                Value::U32(id),
            ));
        }
    } else {
        return Err(unsupported(
            "a BPE tokenizer that is neither byte-level nor SentencePiece-style (byte fallback) has no llama.cpp model".into(),
        ));
    }
    md.push(("tokenizer.ggml.tokens".to_string(), strings(tokens)));
    if let Some(pad) = ["<pad>", "<|pad|>", "[PAD]"]
        .iter()
        .find_map(|p| tok.token_to_id(p))
    {
        md.push((
            "tokenizer.ggml.padding_token_id".to_string(),
            Value::U32(pad),
        ));
    }
    Ok(md)
}

/// Every token text by id (added tokens included); a gap in the ids is an error, since GGUF
/// addresses tokens by position.
fn tokens_by_id(tok: &Tokenizer) -> Result<Vec<String>> {
    let vocab = tok.inner.get_vocab(true);
    let mut tokens: Vec<Option<String>> = vec![None; vocab.len()];
    for (text, id) in vocab {
        match tokens.get_mut(id as usize) {
            Some(slot) => *slot = Some(text),
            None => {
                return Err(Error::Tokenizer(format!(
                "GGUF export: token id {id} of `{text}` is beyond the {} tokens (ids must be 0..n)",
                tokens.len()
            )))
            }
        }
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            t.ok_or_else(|| Error::Tokenizer(format!("GGUF export: no token has id {id}")))
        })
        .collect()
}

/// BPE merges from the serialised model, in rank order (`[a, b]` pairs or legacy `"a b"`).
fn merges_of(model: &Json) -> Result<Vec<(String, String)>> {
    let bad = |m: &Json| Error::Tokenizer(format!("GGUF export: unreadable merge {m}"));
    model["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| match m {
            Json::Array(pair) => match (pair.first(), pair.get(1)) {
                (Some(Json::String(a)), Some(Json::String(b))) => Ok((a.clone(), b.clone())),
                _ => Err(bad(m)),
            },
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(m)),
            _ => Err(bad(m)),
        })
        .collect()
}

/// llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE pre-tokenizer; `None` when the
/// tokenizer is not byte-level.
fn byte_level_pre(full: &Json) -> Result<Option<&'static str>> {
    let pre = &full["pre_tokenizer"];
    let parts: Vec<&Json> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![pre],
        None => vec![],
    };
    let kinds: Vec<&str> = parts.iter().filter_map(|p| p["type"].as_str()).collect();
    if !kinds.contains(&"ByteLevel") {
        return Ok(None);
    }
    let regex_of = |p: &Json| p["pattern"]["Regex"].as_str().map(str::to_owned);
    let name = match kinds.as_slice() {
        ["ByteLevel"] if parts[0]["use_regex"] != false => Some("gpt2"),
        ["Digits", "ByteLevel"]
            if parts[0]["individual_digits"] == true && parts[1]["use_regex"] != false =>
        {
            Some("smollm")
        }
        ["Split", "ByteLevel"] if parts[1]["use_regex"] == false => {
            match regex_of(parts[0]).as_deref() {
                Some(r) if r == REGEX_LLAMA3 || r == REGEX_LLAMA3_HF => Some("llama-bpe"),
                Some(r) if r == REGEX_QWEN2 || r == REGEX_QWEN2_HF => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    };
    name.map(Some).ok_or_else(|| {
        Error::Tokenizer(format!(
            "GGUF export: llama.cpp has no name for this byte-level pre-tokenizer ({pre}); \
             known: GPT-2, SmolLM2/StarCoder (single digits), Llama 3, Qwen 2"
        ))
    })
}

/// Whether SentencePiece-style normalisation puts `▁` before the text (legacy `Prepend`
/// normalizer, or a `Metaspace` pre-tokenizer that prepends).
fn adds_space_prefix(full: &Json) -> bool {
    let mut found = false;
    let mut visit = |v: &Json| {
        if v["type"] == "Prepend" && v["prepend"] == "▁" {
            found = true;
        }
        if v["type"] == "Metaspace" && v["prepend_scheme"] != "never" {
            found = true;
        }
    };
    for part in ["normalizer", "pre_tokenizer"] {
        let v = &full[part];
        visit(v);
        for key in ["normalizers", "pretokenizers"] {
            if let Some(items) = v[key].as_array() {
                items.iter().for_each(&mut visit);
            }
        }
    }
    found
}

/// `<0x0A>`: SentencePiece's byte-fallback pieces.
fn is_byte_piece(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>')
}

/// Scores for llama.cpp's SentencePiece tokenizer, which merges the adjacent pair whose
/// result scores highest: a piece made by the merge of rank r scores -(r + 1), so merges apply
/// in rank order; pieces no merge makes (characters, bytes, control tokens) score 0, as in
/// SentencePiece's own models. The GGUF reader rebuilds the same merge order from them.
fn scores_from_merges(tokens: &[String], merges: &[(String, String)]) -> Vec<f32> {
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut scores = vec![0f32; tokens.len()];
    let mut scored = vec![false; tokens.len()];
    for (rank, (a, b)) in merges.iter().enumerate() {
        if let Some(&i) = index.get(format!("{a}{b}").as_str()) {
            if !scored[i] {
                scored[i] = true;
                scores[i] = -(rank as f32 + 1.0);
            }
        }
    }
    scores
}
