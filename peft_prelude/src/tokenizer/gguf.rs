//! Rebuilding a `tokenizers` tokenizer from GGUF `tokenizer.ggml.*` metadata.
//!
//! * `llama`: SentencePiece BPE (Llama 2, Mistral 7B, ...). The file has pieces, scores and
//!   token types but no merges; the merges are rebuilt from the scores exactly as
//!   `transformers`' legacy `LlamaConverter` does, which gives SentencePiece's tokenization.
//! * `gpt2`: byte-level BPE with merges (SmolLM2, Llama 3, Qwen2, ...); the pre-tokenizer
//!   regex is chosen from `tokenizer.ggml.pre` the way llama.cpp does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{template_processor, SpecialToken};
use crate::error::{Error, Result};

pub(super) const BOS_KEY: &str = "tokenizer.ggml.bos_token_id";
pub(super) const EOS_KEY: &str = "tokenizer.ggml.eos_token_id";

/// llama.cpp's `llama_token_type`.
mod token_type {
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// What [`build`] produces; [`super::Tokenizer::from_gguf`] wraps it.
pub(super) struct Built {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub chat_template: Option<String>,
}

pub(super) fn build(content: &Content, path: &Path) -> Result<Built> {
    let meta = Meta { content, path };
    let model = meta.require_str("tokenizer.ggml.model")?;
    let tokens = meta.require_strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(Error::corrupt(path, "`tokenizer.ggml.tokens` is empty"));
    }
    let types = match meta.ints("tokenizer.ggml.token_type")? {
        Some(types) => {
            meta.check_len("tokenizer.ggml.token_type", types.len(), tokens.len())?;
            types
        }
        None => vec![1; tokens.len()],
    };
    let bos_id = meta.token_id(BOS_KEY, tokens.len())?;
    let eos_id = meta.token_id(EOS_KEY, tokens.len())?;
    // llama.cpp writes `unknown_token_id`; some converters `unk_token_id`.
    let unk_id = match meta.token_id("tokenizer.ggml.unknown_token_id", tokens.len())? {
        Some(id) => Some(id),
        None => meta.token_id("tokenizer.ggml.unk_token_id", tokens.len())?,
    };

    let mut inner = match model {
        "llama" => {
            let scores = meta.floats("tokenizer.ggml.scores")?.ok_or_else(|| {
                Error::corrupt(
                    path,
                    "SentencePiece (`llama`) tokenizer without `tokenizer.ggml.scores`",
                )
            })?;
            meta.check_len("tokenizer.ggml.scores", scores.len(), tokens.len())?;
            let unk = unk_id
                .map(|id| tokens[id as usize])
                .or_else(|| tokens.contains(&"<unk>").then_some("<unk>"));
            let add_space_prefix = meta
                .bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            sentencepiece_bpe(&tokens, &scores, unk, add_space_prefix, path)?
        }
        "gpt2" => {
            let merges = meta.require_strings("tokenizer.ggml.merges")?;
            let pre = meta.str("tokenizer.ggml.pre")?.unwrap_or("default");
            let unk = unk_id.map(|id| tokens[id as usize]);
            byte_level_bpe(&tokens, &merges, pre, unk, path)?
        }
        other => {
            return Err(Error::unsupported(
                path,
                format!(
                    "tokenizer model `tokenizer.ggml.model` = `{other}` \
                     (supported: `llama` (SentencePiece BPE), `gpt2` (byte-level BPE))"
                ),
            ))
        }
    };

    // Control and unknown tokens are special (matched in text, skippable in decode);
    // user-defined ones are matched in text but decoded like normal text.
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (&text, &kind) in tokens.iter().zip(&types) {
        match kind {
            token_type::UNKNOWN | token_type::CONTROL => {
                special.push(AddedToken::from(text, true).normalized(false))
            }
            token_type::USER_DEFINED => {
                user_defined.push(AddedToken::from(text, false).normalized(false))
            }
            _ => {}
        }
    }
    // bos/eos/unk are special whatever their type says (as in llama.cpp).
    for id in [bos_id, eos_id, unk_id].into_iter().flatten() {
        let text = tokens[id as usize];
        if !special.iter().any(|t| t.content == text) {
            special.push(AddedToken::from(text, true).normalized(false));
        }
    }
    inner
        .add_special_tokens(special)
        .map_err(|e| Error::corrupt(path, format!("cannot register special tokens: {e}")))?;
    inner
        .add_tokens(user_defined)
        .map_err(|e| Error::corrupt(path, format!("cannot register user-defined tokens: {e}")))?;

    // SentencePiece models add BOS unless told otherwise; byte-level ones do not.
    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let special_token = |id: Option<u32>, wanted: bool| {
        id.filter(|_| wanted).map(|id| SpecialToken {
            text: tokens[id as usize].to_owned(),
            id,
        })
    };
    let template = template_processor(
        special_token(bos_id, add_bos).as_ref(),
        special_token(eos_id, add_eos).as_ref(),
    )?;
    let processor = match (inner.get_post_processor().cloned(), template) {
        (Some(byte_level), Some(template)) => Some(PostProcessorWrapper::Sequence(
            tokenizers::processors::sequence::Sequence::new(vec![byte_level, template]),
        )),
        (existing, template) => template.or(existing),
    };
    inner.with_post_processor(processor);

    let chat_template = meta.str("tokenizer.chat_template")?.map(str::to_owned);
    Ok(Built {
        inner,
        bos_id,
        eos_id,
        chat_template,
    })
}

/// SentencePiece BPE as `transformers`' legacy `LlamaConverter` builds it: normalizer
/// `Prepend("▁") + Replace(" ", "▁")`, no pre-tokenizer, byte fallback, and the decoder that
/// undoes it all.
fn sentencepiece_bpe(
    tokens: &[&str],
    scores: &[f32],
    unk: Option<&str>,
    add_space_prefix: bool,
    path: &Path,
) -> Result<tokenizers::Tokenizer> {
    let merges = sentencepiece_merges(tokens, scores);
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| (t.to_owned(), id as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.to_owned());
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::corrupt(path, format!("cannot build the BPE model: {e}")))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| Error::Tokenizer(format!("Replace({from:?}): {e}")))
    };
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".to_owned()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| Error::Tokenizer(format!("cannot set the normalizer: {e}")))?;

    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        // Removes the space the normalizer prepended.
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// Merges for a SentencePiece BPE vocabulary, as `transformers`' `generate_merges`:
/// every split of a piece into two pieces that are both in the vocabulary, ordered by the
/// merged piece's score (descending), then by the lengths of the left and right halves in
/// characters (descending), then by piece id, then by the ids of the halves.
///
/// The tie-breaks matter: the whitespace pieces (`▁▁`, `▁▁▁▁`, ...) of Mistral's vocabulary
/// all score -1e9 and the 259 byte/control pieces 0. With this order the result equals the
/// `merges` of Mistral's converted `tokenizer.json` element for element (checked in the
/// parity tests), and hence SentencePiece's tokenization.
pub(super) fn sentencepiece_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    // Python's `{piece: id}` keeps the last id of a duplicated piece; so do we.
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| (t, id as u32))
        .collect();

    struct Candidate {
        score: f32,
        left_chars: usize,
        right_chars: usize,
        piece: u32,
        split: usize,
    }
    // A half is another piece of the vocabulary, so no half is longer (in bytes) than the
    // longest other piece: splits outside that window cannot match. Without this bound a
    // single huge piece (a hostile file) costs time quadratic in its length.
    let (mut longest, mut second) = (0usize, 0usize);
    for t in tokens {
        if t.len() > longest {
            second = longest;
            longest = t.len();
        } else if t.len() > second {
            second = t.len();
        }
    }
    let mut candidates = Vec::new();
    let mut local = Vec::new();
    for (piece, (&text, &score)) in tokens.iter().zip(scores).enumerate() {
        let max_half = if text.len() == longest {
            second
        } else {
            longest
        };
        if text.len() > 2 * max_half {
            continue;
        }
        // NaN would break the total order the sort needs; -0.0 must tie with 0.0 as in Python.
        let score = if score.is_nan() {
            f32::NEG_INFINITY
        } else {
            score + 0.0
        };
        let total_chars = text.chars().count();
        local.clear();
        for (left_chars, (split, _)) in text.char_indices().enumerate().skip(1) {
            if split > max_half {
                break;
            }
            if text.len() - split > max_half {
                continue;
            }
            let (left, right) = text.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                local.push((
                    (l, r),
                    Candidate {
                        score,
                        left_chars,
                        right_chars: total_chars - left_chars,
                        piece: piece as u32,
                        split,
                    },
                ));
            }
        }
        local.sort_by_key(|(ids, _)| *ids);
        candidates.extend(local.drain(..).map(|(_, c)| c));
    }
    // Stable sort: equal keys keep the piece-id / half-id order built above.
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    candidates
        .into_iter()
        .map(|c| {
            let (left, right) = tokens[c.piece as usize].split_at(c.split);
            (left.to_owned(), right.to_owned())
        })
        .collect()
}

/// The Llama 3 and Qwen 2 regexes (the GPT-2 one is built into the `ByteLevel` pre-tokenizer).
pub(super) const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Byte-level BPE with the pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`.
fn byte_level_bpe(
    tokens: &[&str],
    merges: &[&str],
    pre: &str,
    unk: Option<&str>,
    path: &Path,
) -> Result<tokenizers::Tokenizer> {
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| {
                    Error::corrupt(
                        path,
                        format!("`tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by a space"),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| (t.to_owned(), id as u32))
        .collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.to_owned());
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::corrupt(path, format!("cannot build the BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);

    // llama.cpp never adds a prefix space for BPE vocabularies.
    let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex);
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerSequence::new(vec![split.into(), byte_level(false).into()]).into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // Plain GPT-2 regex. A missing `pre` is what old converters wrote; llama.cpp falls
        // back to its default in that case too.
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => byte_level(true).into(),
        // `\p{N}` (one digit per token) first, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
            PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level(true).into()])
                .into()
        }
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "lfm2" => {
            split(REGEX_LLAMA3)?
        }
        "qwen2" | "deepseek-r1-qwen" => {
            inner
                .with_normalizer(Some(NFC))
                .map_err(|e| Error::Tokenizer(format!("cannot set the normalizer: {e}")))?;
            split(REGEX_QWEN2)?
        }
        other => {
            return Err(Error::unsupported(
                path,
                format!(
                    "byte-level BPE pre-tokenizer `tokenizer.ggml.pre` = `{other}` \
                     (supported: default/gpt2, smollm/starcoder/refact/command-r, \
                     llama3/llama-bpe/smaug-bpe, qwen2)"
                ),
            ))
        }
    };
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    inner.with_post_processor(Some(ByteLevel::new(false, true, true)));
    Ok(inner)
}

/// Typed access to the metadata; every mismatch is a [`Error::Corrupt`] naming file and key.
struct Meta<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        Error::corrupt(
            self.path,
            format!(
                "`{key}` should be {expected}, found {:?}",
                found.value_type()
            ),
        )
    }

    fn missing(&self, key: &str) -> Error {
        Error::corrupt(self.path, format!("missing tokenizer metadata `{key}`"))
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    fn require_str(&self, key: &str) -> Result<&'a str> {
        self.str(key)?.ok_or_else(|| self.missing(key))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a boolean", v)),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(values)) => Ok(Some(values)),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    fn require_strings(&self, key: &str) -> Result<Vec<&'a str>> {
        let values = self.array(key)?.ok_or_else(|| self.missing(key))?;
        values
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.wrong_type(key, "an array of strings", v)),
            })
            .collect()
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(values) = self.array(key)? else {
            return Ok(None);
        };
        values
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                v => Err(self.wrong_type(key, "an array of floats", v)),
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(values) = self.array(key)? else {
            return Ok(None);
        };
        values
            .iter()
            .map(|v| integer(v).ok_or_else(|| self.wrong_type(key, "an array of integers", v)))
            .collect::<Result<_>>()
            .map(Some)
    }

    /// A token id that must index `tokenizer.ggml.tokens`.
    fn token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let id = integer(v).ok_or_else(|| self.wrong_type(key, "an integer", v))?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
            _ => Err(Error::corrupt(
                self.path,
                format!("`{key}` = {id} is outside the vocabulary of {n_tokens} tokens"),
            )),
        }
    }

    fn check_len(&self, key: &str, len: usize, n_tokens: usize) -> Result<()> {
        if len == n_tokens {
            Ok(())
        } else {
            Err(Error::corrupt(
                self.path,
                format!("`{key}` has {len} entries but there are {n_tokens} tokens"),
            ))
        }
    }
}

fn integer(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_score_then_length_then_id() {
        // "ab" (score -1) beats "bc" (-2); "abc" splits both ways, longer left first.
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let merges = sentencepiece_merges(&tokens, &scores);
        let merges: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(merges, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")],);
    }

    #[test]
    fn byte_level_pre_tokenizers_split_digits_like_llama_cpp() {
        // `Ġ` is the byte-level space. " 12" is one regex chunk for GPT-2, a space and two
        // single digits for SmolLM2/StarCoder, a space and a 1-3 digit group for Llama 3.
        let tokens = ["1", "2", "Ġ", "Ġ1", "12"];
        let merges = ["Ġ 1", "1 2"];
        let path = Path::new("test.gguf");
        let ids = |pre: &str| {
            let tok = byte_level_bpe(&tokens, &merges, pre, None, path).unwrap();
            tok.encode(" 12", false).unwrap().get_ids().to_vec()
        };
        assert_eq!(ids("gpt2"), [3, 1]);
        assert_eq!(ids("smollm"), [2, 0, 1]);
        assert_eq!(ids("llama-bpe"), [2, 4]);
        assert!(matches!(
            byte_level_bpe(&tokens, &merges, "mystery", None, path),
            Err(Error::Unsupported { what, .. }) if what.contains("`mystery`")
        ));
    }

    #[test]
    fn a_huge_piece_is_skipped_without_changing_the_merges() {
        let huge = "a".repeat(200_000);
        let tokens = ["a", "b", "ab", huge.as_str()];
        // (Quadratic before the bound: 7 s for this piece; the fuzzer's timeout watches time.)
        let merges = sentencepiece_merges(&tokens, &[0.0, 0.0, -1.0, -2.0]);
        assert_eq!(merges, [("a".to_string(), "b".to_string())]);
    }

    #[test]
    fn nan_scores_do_not_panic() {
        let tokens = ["a", "b", "ab", "ba"];
        let scores = [0.0, f32::NAN, f32::NAN, -0.0];
        assert_eq!(sentencepiece_merges(&tokens, &scores).len(), 2);
    }
}
