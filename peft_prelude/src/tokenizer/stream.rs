//! Incremental decoding of generated tokens.
//!
//! Decoding one token at a time is wrong in two ways: a character split over several
//! byte tokens (`<0xF0> <0x9F> <0xA6> <0x80>` = 🦀) comes out as replacement characters, and
//! SentencePiece decoders strip the leading space of whatever they decode, so `▁world`
//! alone decodes to `world`. [`TokenStream`] therefore decodes a short window that starts
//! at the tokens it emitted last (the *prefix*), and emits only what the new tokens add to
//! the prefix's text, once that text does not end in an incomplete character.

use std::ops::Range;

use super::Tokenizer;
use crate::error::Result;

/// How many trailing prompt tokens [`TokenStream::with_context`] keeps as decoding context.
const CONTEXT_TOKENS: usize = 8;

/// What a decoder makes of bytes that are not (yet) valid UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

/// Turns generated ids into text chunks as they arrive. Concatenating every chunk that
/// [`push`](Self::push) and [`finish`](Self::finish) return gives
/// `tokenizer.decode(ids, skip_special_tokens)`.
///
/// ```no_run
/// # fn main() -> peft_prelude::Result<()> {
/// # let tokenizer = peft_prelude::tokenizer::Tokenizer::from_file("tokenizer.json")?;
/// # let generated: Vec<u32> = vec![];
/// let mut stream = tokenizer.stream(true);
/// for id in generated {
///     if let Some(text) = stream.push(id)? {
///         print!("{text}");
///     }
/// }
/// if let Some(rest) = stream.finish()? {
///     print!("{rest}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// Context ids (never emitted) followed by the pushed ids.
    ids: Vec<u32>,
    context_len: usize,
    /// `ids[prefix_offset..read_offset]` is the last emitted chunk, kept as decoding context.
    prefix_offset: usize,
    /// Everything before this has been emitted.
    read_offset: usize,
}

impl<'a> TokenStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        Self::with_context(tokenizer, &[], skip_special_tokens)
    }

    /// A stream that continues `context` (the prompt ids). Its text is not emitted, but the
    /// first generated token is decoded after it, so a leading `▁` becomes the space it is
    /// (`"Once upon a time,"` + `▁there` emits `" there"`, not `"there"`).
    pub fn with_context(
        tokenizer: &'a Tokenizer,
        context: &[u32],
        skip_special_tokens: bool,
    ) -> Self {
        let tail = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            tokenizer,
            skip_special_tokens,
            ids: tail.to_vec(),
            context_len: tail.len(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// Adds one generated id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.decode(self.prefix_offset..self.read_offset)?;
        let text = self.decode(self.prefix_offset..self.ids.len())?;
        // Wait while the text ends in an incomplete character or the token added nothing
        // (a skipped special token, or the first byte token of a character).
        if text.len() <= prefix.len() || text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(non_empty(delta(&prefix, &text)))
    }

    /// Emits whatever is still held back (an incomplete character comes out as U+FFFD,
    /// as [`Tokenizer::decode`] would print it).
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = self.decode(self.prefix_offset..self.read_offset)?;
        let text = self.decode(self.prefix_offset..self.ids.len())?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(non_empty(delta(&prefix, &text)))
    }

    /// The ids pushed so far (without the context).
    pub fn ids(&self) -> &[u32] {
        &self.ids[self.context_len..]
    }

    /// The text of every pushed id, as [`Tokenizer::decode`] gives it.
    pub fn text(&self) -> Result<String> {
        self.tokenizer.decode(self.ids(), self.skip_special_tokens)
    }

    fn decode(&self, range: Range<usize>) -> Result<String> {
        self.tokenizer
            .decode(&self.ids[range], self.skip_special_tokens)
    }
}

/// What `text` adds to `prefix`. Decoders are concatenative on complete characters, so
/// `text` normally starts with `prefix`; if it does not (a character the prefix held back
/// was completed), everything after the common prefix is new.
fn delta(prefix: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8());
    text[common..].to_owned()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::mistral;

    const TEXTS: &[&str] = &[
        "Rust 🦀 goes 🚀! Thumbs up 👍🏽 and family 👨\u{200d}👩\u{200d}👧.",
        "日本語のテキスト、中文文本和한국어 문장。",
        "   leading and trailing spaces   ",
        "line one\nline two\n\n  indented",
        "🦀",
        " ",
    ];

    fn stream_all(tok: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
        let mut stream = tok.stream(skip);
        let mut chunks = Vec::new();
        for &id in ids {
            chunks.extend(stream.push(id).unwrap());
        }
        chunks.extend(stream.finish().unwrap());
        assert_eq!(stream.ids(), ids);
        chunks
    }

    #[test]
    fn tokenizer_stream_concatenation_equals_decode() {
        let tok = mistral();
        for text in TEXTS {
            for add_special in [false, true] {
                let ids = tok.encode(text, add_special).unwrap();
                for skip in [false, true] {
                    let chunks = stream_all(&tok, &ids, skip);
                    assert_eq!(chunks.concat(), tok.decode(&ids, skip).unwrap(), "{text:?}");
                    for chunk in &chunks {
                        assert!(
                            !chunk.contains(REPLACEMENT),
                            "{text:?}: split char in {chunks:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tokenizer_stream_holds_back_partial_characters() {
        let tok = mistral();
        let ids = tok.encode("a🦀", false).unwrap();
        // "▁a" then the four byte-fallback tokens of the crab.
        assert_eq!(ids.len(), 5, "{ids:?}");
        let mut stream = tok.stream(false);
        assert_eq!(stream.push(ids[0]).unwrap().as_deref(), Some("a"));
        for &id in &ids[1..4] {
            assert_eq!(stream.push(id).unwrap(), None);
        }
        assert_eq!(stream.push(ids[4]).unwrap().as_deref(), Some("🦀"));
        assert_eq!(stream.finish().unwrap(), None);
    }

    #[test]
    fn tokenizer_stream_finish_flushes_incomplete_bytes() {
        let tok = mistral();
        let ids = tok.encode("🦀", false).unwrap();
        let mut stream = tok.stream(false);
        for &id in &ids[..ids.len() - 1] {
            assert_eq!(stream.push(id).unwrap(), None);
        }
        let rest = stream.finish().unwrap().unwrap();
        assert_eq!(rest, tok.decode(&ids[..ids.len() - 1], false).unwrap());
        assert!(rest.contains(REPLACEMENT));
    }

    #[test]
    fn tokenizer_stream_context_keeps_the_leading_space() {
        let tok = mistral();
        let prompt = tok.encode("Once upon a time,", true).unwrap();
        let generated = tok.encode("there was a 🦀", false).unwrap();
        // Without context the first word loses its space, as decode(generated) does.
        assert_eq!(
            stream_all(&tok, &generated, true).concat(),
            "there was a 🦀"
        );

        let mut stream = TokenStream::with_context(&tok, &prompt, true);
        let mut out = String::new();
        for &id in &generated {
            out.extend(stream.push(id).unwrap());
        }
        out.extend(stream.finish().unwrap());
        assert_eq!(out, " there was a 🦀");
        assert_eq!(stream.ids(), generated);
        let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
        assert_eq!(
            tok.decode(&all, true).unwrap(),
            format!("{}{out}", tok.decode(&prompt, true).unwrap())
        );
    }
}
