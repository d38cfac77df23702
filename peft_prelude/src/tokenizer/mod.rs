//! Tokenizers for every way a model arrives: a Hugging Face `tokenizer.json` (plus its
//! `tokenizer_config.json`), or the `tokenizer.ggml.*` metadata of a GGUF file, which is
//! rebuilt into an equivalent [`tokenizers::Tokenizer`].
//!
//! * [`Tokenizer`] wraps the `tokenizers` crate with the model's special tokens and chat
//!   template, and turns every failure into the crate's [`Error`].
//! * [`TokenStream`] decodes generated ids incrementally without ever emitting half a
//!   character.
//! * [`ChatMessage`] plus [`Tokenizer::apply_chat_template`] render Hugging Face chat templates.
//!
//! ```no_run
//! # fn main() -> peft_prelude::Result<()> {
//! use peft_prelude::tokenizer::{ChatMessage, Tokenizer};
//!
//! let tok = Tokenizer::from_file("tiny-mistral/tokenizer.json")?;
//! let ids = tok.encode("Hello world", true)?; // [1, 22557, 1526]: BOS is added
//! assert_eq!(tok.decode(&ids, true)?, "Hello world");
//!
//! let gguf = Tokenizer::from_gguf_file("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let prompt = gguf.apply_chat_template(&[ChatMessage::new("user", "Hi!")], true)?;
//! # Ok(()) }
//! ```

mod chat;
mod export;
mod gguf;
mod stream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value as GgufValue;

use serde::{Deserialize, Serialize};
use tokenizers::processors::PostProcessorWrapper;

use crate::error::{contain_panic, read_file, read_json, Error, Result};

pub use stream::TokenStream;

/// One turn of a conversation, as Hugging Face chat templates expect it
/// (`{"role": "user", "content": "..."}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or whatever else the template understands.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A text tokenizer together with the model's special tokens and chat template.
///
/// Cheap enough to clone (the vocabulary is copied, which takes a few milliseconds).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    /// Whether `encode(.., add_special_tokens = true)` puts BOS in front (observed, not assumed).
    add_bos: bool,
    chat_template: Option<String>,
    /// `get_vocab_size(true)` builds a whole map; computed once.
    vocab_size: usize,
    /// The `tokenizer.*` metadata of the GGUF this tokenizer was built from, kept so that a
    /// GGUF export carries the exact vocabulary, scores and pre-tokenizer name.
    gguf_metadata: Option<Arc<Vec<(String, GgufValue)>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SpecialToken {
    text: String,
    id: u32,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` (or a directory containing one).
    ///
    /// A sibling `tokenizer_config.json`, when present, supplies `bos_token`, `eos_token`,
    /// `chat_template` and the `add_bos_token` / `add_eos_token` flags; a sibling
    /// `chat_template.jinja` (or `chat_template.json`), as newer `transformers` versions
    /// save it, takes precedence for the template. Without a config, BOS is taken from
    /// what the post-processor prepends and EOS from a short list of well-known names
    /// (`</s>`, `<|endoftext|>`, `<|end_of_text|>`, `<eos>`); use
    /// [`set_eos_token`](Self::set_eos_token) to override.
    ///
    /// When the config sets `add_bos_token` / `add_eos_token` explicitly and `tokenizer.json`'s
    /// template post-processor disagrees, the post-processor is rebuilt to follow the config
    /// (as `transformers`' Llama tokenizers do).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_path(path.as_ref())
    }

    fn from_path(path: &Path) -> Result<Self> {
        let mut path = path.to_path_buf();
        if path.is_dir() {
            path.push("tokenizer.json");
        }
        let bytes = read_file(&path)?;
        // `tokenizers` panics on some malformed files (a decoder's syntax error, merges longer
        // than any token, a template naming a missing token), at load or at the first encode:
        // build and probe it here, where a panic is contained and the file is named.
        let mut tok = contain_panic(|| -> Result<Self> {
            let inner = tokenizers::Tokenizer::from_bytes(&bytes)
                .map_err(|e| Error::corrupt(&path, format!("not a valid tokenizer.json: {e}")))?;
            let tok = Self::from_tokenizers(inner);
            tok.probe()
                .map_err(|e| Error::corrupt(&path, e.to_string()))?;
            Ok(tok)
        })
        .map_err(|panic| Error::corrupt(&path, format!("not a valid tokenizer.json: {panic}")))??;

        let dir = path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        if config_path.is_file() {
            let config: serde_json::Value = read_json(&config_path)?;
            contain_panic(|| -> Result<()> {
                tok.apply_config(&config, &config_path)?;
                tok.probe()
                    .map_err(|e| Error::corrupt(&config_path, e.to_string()))
            })
            .map_err(|panic| Error::corrupt(&config_path, panic))??;
        }
        if let Some(template) = read_sibling_template(dir)? {
            tok.chat_template = Some(template);
        }
        Ok(tok)
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// Supports `tokenizer.ggml.model` = `llama` (SentencePiece BPE: merges are rebuilt from
    /// the pieces' scores exactly as `transformers`' converter does) and `gpt2` (byte-level
    /// BPE with merges; the pre-tokenizer follows `tokenizer.ggml.pre`). The chat template
    /// comes from `tokenizer.chat_template`. `path` is only used in error messages.
    pub fn from_gguf(
        content: &candle_core::quantized::gguf_file::Content,
        path: impl AsRef<Path>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (built, mut tok) = contain_panic(|| -> Result<_> {
            let mut built = gguf::build(content, path)?;
            let inner = std::mem::replace(
                &mut built.inner,
                tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default()),
            );
            let tok = Self::from_tokenizers(inner);
            tok.probe()
                .map_err(|e| Error::corrupt(path, e.to_string()))?;
            Ok((built, tok))
        })
        .map_err(|panic| Error::corrupt(path, format!("unusable tokenizer metadata: {panic}")))??;
        // The metadata is authoritative; the guesses only stay when a key is absent.
        if let Some(bos) = resolve_id(&tok.inner, built.bos_id, path, gguf::BOS_KEY)? {
            tok.bos = Some(bos);
        }
        if let Some(eos) = resolve_id(&tok.inner, built.eos_id, path, gguf::EOS_KEY)? {
            tok.eos = Some(eos);
        }
        tok.refresh_add_bos();
        tok.chat_template = built.chat_template;
        let mut original: Vec<(String, GgufValue)> = content
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        original.sort_by(|a, b| a.0.cmp(&b.0));
        tok.gguf_metadata = Some(Arc::new(original));
        Ok(tok)
    }

    /// Reads the metadata of a GGUF file and calls [`from_gguf`](Self::from_gguf).
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .map_err(|e| Error::corrupt(path, format!("not a valid GGUF file: {e}")))?;
        Self::from_gguf(&content, path)
    }

    /// Wraps an existing `tokenizers` tokenizer. BOS is what its post-processor prepends, EOS
    /// the first well-known end token it has; there is no chat template.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        let mut tok = Self {
            inner,
            bos: None,
            eos: None,
            add_bos: false,
            chat_template: None,
            vocab_size,
            gguf_metadata: None,
        };
        tok.bos = tok.guess_bos();
        tok.eos = ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"]
            .iter()
            .find_map(|t| tok.special_token(t));
        tok.refresh_add_bos();
        tok
    }

    /// Token ids of `text`; with `add_special_tokens`, the post-processor's BOS/EOS are added.
    /// Special tokens written in the text (`<|im_start|>`, `</s>`) always map to their ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = contain_panic(|| self.inner.encode(text, add_special_tokens))
            .map_err(|panic| Error::Tokenizer(format!("encoding failed: {panic}")))?
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`. Ids outside the vocabulary are skipped (as `tokenizers` does).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        contain_panic(|| self.inner.decode(ids, skip_special_tokens))
            .map_err(|panic| Error::Tokenizer(format!("decoding failed: {panic}")))?
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Encodes and decodes a short text with and without special tokens: the checks a loader
    /// runs so that a tokenizer that cannot work fails at load, naming its file.
    fn probe(&self) -> Result<()> {
        for special in [true, false] {
            let ids = self.encode("Hello, wörld 12 ▁", special)?;
            self.decode(&ids, !special)?;
        }
        Ok(())
    }

    /// An incremental decoder for generated ids; see [`TokenStream`].
    pub fn stream(&self, skip_special_tokens: bool) -> TokenStream<'_> {
        TokenStream::new(self, skip_special_tokens)
    }

    /// Renders the chat template for `messages` (with `bos_token`, `eos_token`,
    /// `add_generation_prompt`, `tools = none` and `documents = none` in scope).
    ///
    /// Errors with [`Error::ChatTemplate`] when the tokenizer has no template, the template
    /// does not parse, or it calls `raise_exception`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Like [`apply_chat_template`](Self::apply_chat_template), with extra template variables
    /// (for example `{"enable_thinking": false}` or `{"tools": [...]}`); they override the
    /// defaults.
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate(
                "this tokenizer has no chat template (none in tokenizer_config.json, \
                 chat_template.jinja or the GGUF metadata); set one with set_chat_template"
                    .into(),
            )
        })?;
        chat::render(
            template,
            &chat::Context {
                messages,
                add_generation_prompt,
                bos_token: self.bos_token(),
                eos_token: self.eos_token(),
                extra,
            },
        )
    }

    /// The chat template source, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Replaces the chat template (a Jinja source, as in `tokenizer_config.json`).
    pub fn set_chat_template(&mut self, template: impl Into<String>) {
        self.chat_template = Some(template.into());
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.id)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|t| t.id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|t| t.text.as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|t| t.text.as_str())
    }

    /// Whether `encode(text, true)` starts with the BOS token.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// Sets the BOS token by its text; it must be in the vocabulary.
    pub fn set_bos_token(&mut self, token: &str) -> Result<()> {
        self.bos = Some(self.known_token(token)?);
        self.refresh_add_bos();
        Ok(())
    }

    /// Sets the EOS token by its text; it must be in the vocabulary.
    pub fn set_eos_token(&mut self, token: &str) -> Result<()> {
        self.eos = Some(self.known_token(token)?);
        Ok(())
    }

    /// Replaces the post-processor so that `encode(.., true)` adds BOS and/or EOS
    /// (`BOS $A EOS`, pairs `BOS $A EOS BOS $B EOS`). Needs the respective token to be set.
    pub fn set_special_token_insertion(&mut self, add_bos: bool, add_eos: bool) -> Result<()> {
        let bos = if add_bos {
            Some(self.bos.clone().ok_or_else(|| {
                Error::InvalidArgument("cannot add BOS: the tokenizer has no BOS token".into())
            })?)
        } else {
            None
        };
        let eos = if add_eos {
            Some(self.eos.clone().ok_or_else(|| {
                Error::InvalidArgument("cannot add EOS: the tokenizer has no EOS token".into())
            })?)
        } else {
            None
        };
        let keep_byte_level = matches!(
            self.inner.get_post_processor(),
            Some(PostProcessorWrapper::ByteLevel(_))
        )
        .then(|| self.inner.get_post_processor().cloned())
        .flatten();
        let template = template_processor(bos.as_ref(), eos.as_ref())?;
        let processor = match (keep_byte_level, template) {
            (Some(byte_level), Some(template)) => Some(PostProcessorWrapper::Sequence(
                tokenizers::processors::sequence::Sequence::new(vec![byte_level, template]),
            )),
            (byte_level, template) => template.or(byte_level),
        };
        self.inner.with_post_processor(processor);
        self.refresh_add_bos();
        Ok(())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes the tokenizer as a Hugging Face tokenizer directory: `tokenizer.json`,
    /// `tokenizer_config.json` (special tokens, BOS/EOS flags, chat template) and
    /// `special_tokens_map.json`, each atomically. transformers' `AutoTokenizer` and
    /// [`Tokenizer::from_file`] read it back with the same ids, whatever this tokenizer was
    /// loaded from (a GGUF included).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_pretrained_at(dir.as_ref())
    }

    fn save_pretrained_at(&self, dir: &Path) -> Result<()> {
        export::save_pretrained(self, dir)
    }

    /// The `tokenizer.*` metadata llama.cpp reads from a GGUF: the original file's when the
    /// tokenizer came from one, otherwise derived from the model (byte-level BPE as `gpt2`,
    /// SentencePiece-style BPE as `llama`); special tokens and chat template as they are now.
    pub fn gguf_metadata(&self) -> Result<Vec<(String, GgufValue)>> {
        export::gguf_metadata(self)
    }

    fn special_token(&self, text: &str) -> Option<SpecialToken> {
        self.inner.token_to_id(text).map(|id| SpecialToken {
            text: text.to_owned(),
            id,
        })
    }

    fn known_token(&self, text: &str) -> Result<SpecialToken> {
        self.special_token(text).ok_or_else(|| {
            Error::InvalidArgument(format!("`{text}` is not in the tokenizer's vocabulary"))
        })
    }

    /// The single special token the post-processor puts in front of an empty input, if any.
    fn guess_bos(&self) -> Option<SpecialToken> {
        let encoding = self.inner.encode("", true).ok()?;
        let (&id, mask) = encoding
            .get_ids()
            .first()
            .zip(encoding.get_special_tokens_mask().first())?;
        // An EOS-only template (`$A </s>`) would also put one token here; BOS-ness is a guess
        // that only holds for special tokens.
        if *mask != 1 {
            return None;
        }
        let text = self.inner.id_to_token(id)?;
        Some(SpecialToken { text, id })
    }

    fn refresh_add_bos(&mut self) {
        self.add_bos = match (&self.bos, self.inner.encode("", true)) {
            (Some(bos), Ok(encoding)) => encoding.get_ids().first() == Some(&bos.id),
            _ => false,
        };
    }

    /// Applies `tokenizer_config.json`: special tokens, the template, the BOS/EOS flags.
    fn apply_config(&mut self, config: &serde_json::Value, path: &Path) -> Result<()> {
        let config = config
            .as_object()
            .ok_or_else(|| Error::corrupt(path, "expected a JSON object"))?;
        for (key, slot) in [("bos_token", true), ("eos_token", false)] {
            let Some(value) = config.get(key) else {
                continue;
            };
            let token = match token_text(value) {
                Ok(token) => token,
                Err(()) => {
                    return Err(Error::corrupt(
                        path,
                        format!("`{key}` should be a string, null or {{\"content\": ...}}"),
                    ))
                }
            };
            let resolved = match token {
                None => None,
                Some(text) => Some(self.special_token(text).ok_or_else(|| {
                    Error::corrupt(
                        path,
                        format!("`{key}` is `{text}`, which is not in tokenizer.json's vocabulary"),
                    )
                })?),
            };
            if slot {
                self.bos = resolved;
            } else {
                self.eos = resolved;
            }
        }
        self.refresh_add_bos();

        if let Some(value) = config.get("chat_template") {
            self.chat_template = parse_chat_template(value, path)?;
        }

        let flag = |key: &str| -> Result<Option<bool>> {
            match config.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(Error::corrupt(path, format!("`{key}` should be a boolean"))),
            }
        };
        let (add_bos, add_eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
        if add_bos.is_some() || add_eos.is_some() {
            let adds_eos = self.adds_eos();
            let want_bos = add_bos.unwrap_or(self.add_bos);
            let want_eos = add_eos.unwrap_or(adds_eos);
            // Only a missing or template post-processor is rewritten: others (BERT, RoBERTa,
            // sequences) encode more than BOS/EOS and are left as tokenizer.json has them.
            let rewritable = matches!(
                self.inner.get_post_processor(),
                None | Some(PostProcessorWrapper::Template(_))
            );
            if (want_bos != self.add_bos || want_eos != adds_eos) && rewritable {
                self.set_special_token_insertion(want_bos, want_eos)
                    .map_err(|e| Error::corrupt(path, e.to_string()))?;
            }
        }
        Ok(())
    }

    fn adds_eos(&self) -> bool {
        match (&self.eos, self.inner.encode("x", true)) {
            (Some(eos), Ok(encoding)) => encoding.get_ids().last() == Some(&eos.id),
            _ => false,
        }
    }
}

/// `"<s>"`, `null`, or the older `{"__type": "AddedToken", "content": "<s>", ...}` form.
fn token_text(value: &serde_json::Value) -> std::result::Result<Option<&str>, ()> {
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s)),
        serde_json::Value::Object(map) => match map.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            _ => Err(()),
        },
        _ => Err(()),
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` is used
/// (the only entry when there is just one).
fn parse_chat_template(value: &serde_json::Value, path: &Path) -> Result<Option<String>> {
    #[derive(Deserialize)]
    struct Named {
        name: String,
        template: String,
    }
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Array(_) => {
            let named: Vec<Named> = serde_json::from_value(value.clone()).map_err(|e| {
                Error::corrupt(
                    path,
                    format!("`chat_template` should be a list of {{name, template}}: {e}"),
                )
            })?;
            let single = named.len() == 1;
            Ok(named
                .into_iter()
                .find(|t| single || t.name == "default")
                .map(|t| t.template))
        }
        _ => Err(Error::corrupt(
            path,
            "`chat_template` should be a string or a list of {name, template}",
        )),
    }
}

/// `chat_template.jinja` (transformers >= 4.43) or `chat_template.json` next to tokenizer.json.
fn read_sibling_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let bytes = read_file(&jinja)?;
        return String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Error::corrupt(&jinja, "not valid UTF-8"));
    }
    let json: PathBuf = dir.join("chat_template.json");
    if json.is_file() {
        let value: serde_json::Value = read_json(&json)?;
        return match value.get("chat_template") {
            Some(template) => parse_chat_template(template, &json),
            None => Err(Error::corrupt(&json, "missing `chat_template`")),
        };
    }
    Ok(None)
}

/// Checks a GGUF special-token id against the vocabulary.
fn resolve_id(
    inner: &tokenizers::Tokenizer,
    id: Option<u32>,
    path: &Path,
    key: &str,
) -> Result<Option<SpecialToken>> {
    let Some(id) = id else { return Ok(None) };
    let text = inner
        .id_to_token(id)
        .ok_or_else(|| Error::corrupt(path, format!("`{key}` = {id} is outside the vocabulary")))?;
    Ok(Some(SpecialToken { text, id }))
}

/// `BOS $A EOS` / `BOS $A EOS BOS $B:1 EOS` (pieces omitted when not wanted); `None` when
/// neither is wanted. Built through serde so token texts containing `:` or `$` are safe.
fn template_processor(
    bos: Option<&SpecialToken>,
    eos: Option<&SpecialToken>,
) -> Result<Option<PostProcessorWrapper>> {
    use serde_json::json;
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let special = |t: &SpecialToken, type_id: u32| json!({"SpecialToken": {"id": t.text, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let mut pieces = Vec::new();
        pieces.extend(bos.map(|t| special(t, type_id)));
        pieces.push(sequence(seq, type_id));
        pieces.extend(eos.map(|t| special(t, type_id)));
        if seq == "A" {
            single = pieces.clone();
        }
        pair.extend(pieces);
    }
    let mut special_tokens = serde_json::Map::new();
    for t in bos.into_iter().chain(eos) {
        special_tokens.insert(
            t.text.clone(),
            json!({"id": t.text, "ids": [t.id], "tokens": [t.text]}),
        );
    }
    let processor = json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    });
    serde_json::from_value(processor)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("cannot build the BOS/EOS post-processor: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(rel)
    }

    pub(crate) fn mistral() -> Tokenizer {
        Tokenizer::from_file(fixture("tiny-mistral/tokenizer.json")).unwrap()
    }

    #[test]
    fn tokenizer_json_with_config() {
        let tok = mistral();
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token(), Some("</s>"));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert!(tok.add_bos_token());
        assert_eq!(tok.vocab_size(), 32000);
        assert_eq!(tok.encode("Hello world", true).unwrap(), [1, 22557, 1526]);
        assert_eq!(tok.decode(&[1, 22557, 1526], true).unwrap(), "Hello world");
        assert_eq!(
            tok.decode(&[1, 22557, 1526], false).unwrap(),
            "<s> Hello world"
        );
        assert!(tok.chat_template().is_none());
    }

    #[test]
    fn without_config_bos_eos_are_guessed() {
        let bytes = std::fs::read(fixture("tiny-mistral/tokenizer.json")).unwrap();
        let tok = Tokenizer::from_tokenizers(tokenizers::Tokenizer::from_bytes(bytes).unwrap());
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert!(tok.add_bos_token());
    }

    #[test]
    fn special_token_insertion_can_be_changed() {
        let mut tok = mistral();
        tok.set_special_token_insertion(false, true).unwrap();
        assert!(!tok.add_bos_token());
        assert_eq!(tok.encode("Hello world", true).unwrap(), [22557, 1526, 2]);
        tok.set_special_token_insertion(true, true).unwrap();
        assert_eq!(
            tok.encode("Hello world", true).unwrap(),
            [1, 22557, 1526, 2]
        );
        tok.set_special_token_insertion(false, false).unwrap();
        assert_eq!(tok.encode("Hello world", true).unwrap(), [22557, 1526]);
    }

    #[test]
    fn config_flags_rewrite_a_disagreeing_template() {
        let dir = std::env::temp_dir().join(format!("peft-tok-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            fixture("tiny-mistral/tokenizer.json"),
            dir.join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"add_bos_token": false, "add_eos_token": true,
                "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "x"},
                                  {"name": "default", "template": "{{ bos_token }}"}]}"#,
        )
        .unwrap();
        let tok = Tokenizer::from_file(&dir).unwrap();
        assert_eq!(tok.encode("Hello world", true).unwrap(), [22557, 1526, 2]);
        assert_eq!(tok.chat_template(), Some("{{ bos_token }}"));

        std::fs::write(dir.join("chat_template.jinja"), "{{ eos_token }}").unwrap();
        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "</s>");

        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<nope>"}"#,
        )
        .unwrap();
        let err = Tokenizer::from_file(&dir).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { path, what } if path.ends_with("tokenizer_config.json") && what.contains("<nope>")),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_template_is_a_chat_template_error() {
        let err = mistral()
            .apply_chat_template(&[ChatMessage::user("hi")], true)
            .unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(ref m) if m.contains("no chat template")));
    }
}
