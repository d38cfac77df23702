//! Tokenizer parity against `tests/fixtures/tokenizer/encodings.json` (ids from the Python
//! `tokenizers` / `transformers` stack): tiny-mistral's tokenizer.json, the SentencePiece
//! tokenizer rebuilt from the tiny-mistral GGUFs, SmolLM2's byte-level GGUF tokenizer, the
//! SmolLM2 chat template, streaming decode, and the typed errors.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Value};
use peft_prelude::tokenizer::{ChatMessage, Tokenizer};
use peft_prelude::Error;
use peft_tests::{fixture, json_fixture, smollm2_gguf};
use serde_json::Value as Json;

/// One entry of `encodings.json/strings`.
struct Case {
    name: String,
    text: String,
    /// `ids_no_special`, `ids_with_special` for one tokenizer.
    ids: (Vec<u32>, Vec<u32>),
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("an id")).expect("an u32 id"))
        .collect()
}

fn cases(tokenizer: &str) -> Vec<Case> {
    let encodings = json_fixture("tokenizer/encodings.json");
    let strings = encodings["strings"].as_array().expect("strings");
    assert_eq!(strings.len(), 14, "encodings.json should hold 14 strings");
    strings
        .iter()
        .map(|s| Case {
            name: s["name"].as_str().expect("name").to_owned(),
            text: s["text"].as_str().expect("text").to_owned(),
            ids: (
                ids(&s[tokenizer]["ids_no_special"]),
                ids(&s[tokenizer]["ids_with_special"]),
            ),
        })
        .collect()
}

/// Encodes every case both ways and round-trips it; returns the failures (all of them,
/// so one run shows every mismatch).
fn check(tok: &Tokenizer, tokenizer: &str, roundtrip: impl Fn(&Case) -> bool) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases(tokenizer) {
        let no_special = tok.encode(&case.text, false).unwrap();
        if no_special != case.ids.0 {
            failures.push(format!(
                "{}: no special: got {no_special:?}, expected {:?}",
                case.name, case.ids.0
            ));
        }
        let with_special = tok.encode(&case.text, true).unwrap();
        if with_special != case.ids.1 {
            failures.push(format!(
                "{}: with special: got {with_special:?}, expected {:?}",
                case.name, case.ids.1
            ));
        }
        if roundtrip(&case) {
            let decoded = tok.decode(&no_special, false).unwrap();
            if decoded != case.text {
                failures.push(format!(
                    "{}: decode(encode(s)) = {decoded:?}, expected {:?}",
                    case.name, case.text
                ));
            }
            let decoded = tok.decode(&with_special, true).unwrap();
            if decoded != case.text {
                failures.push(format!(
                    "{}: decode(encode(s, true), skip) = {decoded:?}",
                    case.name
                ));
            }
        }
    }
    failures
}

/// REFERENCE.md: Mistral round-trips every string without `<s>`/`</s>` in its text.
fn mistral_roundtrips(case: &Case) -> bool {
    !case.text.contains("<s>") && !case.text.contains("</s>")
}

fn assert_no_failures(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn mistral_json() -> Tokenizer {
    Tokenizer::from_file(fixture("tiny-mistral/tokenizer.json")).unwrap()
}

fn timed_gguf(path: &Path) -> Tokenizer {
    let start = Instant::now();
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let read = start.elapsed();
    let start = Instant::now();
    let tok = Tokenizer::from_gguf(&content, path).unwrap();
    eprintln!(
        "{}: GGUF metadata read in {read:?}, tokenizer built in {:?}",
        path.file_name().unwrap().to_string_lossy(),
        start.elapsed()
    );
    tok
}

#[test]
fn mistral_tokenizer_json_matches_reference() {
    let tok = mistral_json();
    assert_no_failures(
        "tiny-mistral/tokenizer.json",
        &check(&tok, "mistral", mistral_roundtrips),
    );
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    assert_eq!(
        (tok.bos_token(), tok.eos_token()),
        (Some("<s>"), Some("</s>"))
    );
    assert!(tok.add_bos_token());
}

/// The documented exception: text after a special token gets the dummy-prefix space.
#[test]
fn mistral_eos_string_does_not_round_trip() {
    let tok = mistral_json();
    let ids = tok.encode("Hello</s>world", false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "Hello</s> world");
}

fn check_gguf_llama(file: &str) {
    let path = fixture(&format!("gguf/{file}"));
    let tok = timed_gguf(&path);
    assert_no_failures(file, &check(&tok, "mistral", mistral_roundtrips));
    assert_eq!(
        (tok.bos_token(), tok.eos_token()),
        (Some("<s>"), Some("</s>"))
    );
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    assert!(tok.add_bos_token());
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!(tok.token_to_id("<0x0A>"), Some(13));
    assert_eq!(tok.id_to_token(28705).as_deref(), Some("▁"));
    assert!(tok.chat_template().is_none());
}

#[test]
fn gguf_llama_f32_matches_reference() {
    check_gguf_llama("tiny-mistral-f32.gguf");
}

#[test]
fn gguf_llama_q8_0_matches_reference() {
    check_gguf_llama("tiny-mistral-q8_0.gguf");
}

#[test]
fn gguf_llama_q4_0_matches_reference() {
    check_gguf_llama("tiny-mistral-q4_0.gguf");
}

/// Stronger than the 14 strings: the rebuilt model (vocab and the 58980 merges in rank
/// order), normalizer, decoder and added tokens serialise like tokenizer.json's.
#[test]
fn gguf_llama_pipeline_equals_tokenizer_json() {
    let gguf = Tokenizer::from_gguf_file(fixture("gguf/tiny-mistral-f32.gguf")).unwrap();
    let json = mistral_json();
    let serialise = |t: &Tokenizer| -> Json {
        serde_json::from_str(&t.inner().to_string(false).unwrap()).unwrap()
    };
    let (ours, reference) = (serialise(&gguf), serialise(&json));
    let merges = |v: &Json| v["model"]["merges"].as_array().unwrap().clone();
    let (our_merges, ref_merges) = (merges(&ours), merges(&reference));
    assert_eq!(our_merges.len(), 58980);
    assert_eq!(our_merges.len(), ref_merges.len());
    if let Some(i) = (0..our_merges.len()).find(|&i| our_merges[i] != ref_merges[i]) {
        panic!(
            "merge {i} differs: ours {} vs tokenizer.json {}",
            our_merges[i], ref_merges[i]
        );
    }
    for key in [
        "normalizer",
        "pre_tokenizer",
        "decoder",
        "post_processor",
        "added_tokens",
    ] {
        assert_eq!(ours[key], reference[key], "{key}");
    }
    for key in ["vocab", "unk_token", "fuse_unk", "byte_fallback", "type"] {
        assert_eq!(ours["model"][key], reference["model"][key], "model.{key}");
    }
}

fn smollm2() -> Tokenizer {
    timed_gguf(&smollm2_gguf())
}

#[test]
fn smollm2_gguf_matches_reference() {
    let tok = smollm2();
    // Every SmolLM2 string round-trips, `</s>` included (it is plain text there).
    assert_no_failures("SmolLM2 GGUF", &check(&tok, "smollm2", |_| true));
    assert_eq!(
        (tok.bos_token(), tok.eos_token()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    assert!(!tok.add_bos_token());
    assert_eq!(tok.vocab_size(), 49152);
    // Control tokens are matched in text and skipped on request.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
    assert_eq!(tok.encode("<jupyter_code>", false).unwrap(), [13]);
}

#[test]
fn smollm2_chat_template_matches_reference() {
    let tok = smollm2();
    let reference = &json_fixture("tokenizer/encodings.json")["smollm2_chat"];
    let messages: Vec<ChatMessage> = serde_json::from_value(reference["messages"].clone()).unwrap();
    assert_eq!(
        messages,
        [ChatMessage::new("user", "What is the capital of France?")]
    );
    assert_eq!(reference["add_generation_prompt"], Json::Bool(true));
    let text = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(text, reference["text"].as_str().unwrap());
    assert_eq!(tok.encode(&text, true).unwrap(), ids(&reference["ids"]));

    // Without the generation prompt the assistant header is missing; a system message
    // replaces the default one.
    let text = tok.apply_chat_template(&messages, false).unwrap();
    assert!(text.ends_with("France?<|im_end|>\n"), "{text:?}");
    let with_system = [ChatMessage::system("Be brief."), messages[0].clone()];
    let text = tok.apply_chat_template(&with_system, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// Streaming decode of every reference string gives decode(all ids), and no chunk ever
/// contains a split character.
#[test]
fn token_stream_matches_decode() {
    let streamed = |tok: &Tokenizer, ids: &[u32]| -> Vec<String> {
        let mut stream = tok.stream(false);
        let mut chunks = Vec::new();
        for &id in ids {
            chunks.extend(stream.push(id).unwrap());
        }
        chunks.extend(stream.finish().unwrap());
        chunks
    };
    for (name, tok) in [("mistral", mistral_json()), ("smollm2", smollm2())] {
        for case in cases(name) {
            let ids = tok.encode(&case.text, true).unwrap();
            let chunks = streamed(&tok, &ids);
            assert_eq!(
                chunks.concat(),
                tok.decode(&ids, false).unwrap(),
                "{name}/{}",
                case.name
            );
            for chunk in &chunks {
                assert!(
                    !chunk.contains('\u{FFFD}'),
                    "{name}/{}: split character in {chunks:?}",
                    case.name
                );
            }
            if matches!(case.name.as_str(), "emoji" | "cjk") {
                assert!(chunks.len() > 3, "{name}/{}: {chunks:?}", case.name);
            }
        }
    }
}

#[test]
fn missing_tokenizer_json_is_an_io_error_naming_the_path() {
    let path = fixture("tiny-mistral/no-such-tokenizer.json");
    let err = Tokenizer::from_file(&path).unwrap_err();
    match &err {
        Error::Io { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
    assert!(err.to_string().contains("no-such-tokenizer.json"), "{err}");
}

/// A scratch directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("peft-tokenizer-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn corrupt_tokenizer_json_is_a_corrupt_error_naming_the_path() {
    let dir = TempDir::new("corrupt-json");
    let path = dir.0.join("tokenizer.json");
    // Valid JSON start, then truncated, like an interrupted download.
    let original = std::fs::read(fixture("tiny-mistral/tokenizer.json")).unwrap();
    std::fs::write(&path, &original[..original.len() / 2]).unwrap();
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { path: p, .. } if p == &path),
        "expected Error::Corrupt naming {}, got {err:?}",
        path.display()
    );

    std::fs::write(&path, b"{\"not\": \"a tokenizer\"}").unwrap();
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { path: p, .. } if p == &path),
        "{err:?}"
    );
}

#[test]
fn corrupt_tokenizer_config_is_a_corrupt_error_naming_it() {
    let dir = TempDir::new("corrupt-config");
    std::fs::copy(
        fixture("tiny-mistral/tokenizer.json"),
        dir.0.join("tokenizer.json"),
    )
    .unwrap();
    let config = dir.0.join("tokenizer_config.json");
    std::fs::write(&config, b"{\"bos_token\": ").unwrap();
    let err = Tokenizer::from_file(dir.0.join("tokenizer.json")).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { path, .. } if path == &config),
        "{err:?}"
    );
}

fn strings(items: &[&str]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|s| Value::String((*s).to_owned()))
            .collect(),
    )
}

type Metadata = Vec<(&'static str, Value)>;

/// Writes a GGUF with only metadata (no tensors).
fn write_gguf(dir: &TempDir, name: &str, metadata: &[(&str, Value)]) -> PathBuf {
    let path = dir.0.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut file, &metadata, &[]).unwrap();
    path
}

#[test]
fn gguf_with_unsupported_tokenizer_model_is_unsupported() {
    let dir = TempDir::new("unsupported-gguf");
    let path = write_gguf(
        &dir,
        "bert.gguf",
        &[
            ("tokenizer.ggml.model", Value::String("bert".into())),
            (
                "tokenizer.ggml.tokens",
                strings(&["[PAD]", "[UNK]", "hello"]),
            ),
        ],
    );
    let err = Tokenizer::from_gguf_file(&path).unwrap_err();
    match &err {
        Error::Unsupported { path: p, what } => {
            assert_eq!(p, &path);
            assert!(what.contains("`bert`"), "{what}");
        }
        other => panic!("expected Error::Unsupported, got {other:?}"),
    }
}

#[test]
fn gguf_with_bad_tokenizer_metadata_is_corrupt() {
    let dir = TempDir::new("corrupt-gguf");
    let tokens = strings(&["<unk>", "<s>", "</s>", "a", "b", "ab"]);
    let scores = Value::Array(vec![Value::F32(0.0); 6]);
    // (file name, metadata, the key the error must name)
    let cases: Vec<(&str, Metadata, &str)> = vec![
        (
            "no-model.gguf",
            vec![("tokenizer.ggml.tokens", tokens.clone())],
            "tokenizer.ggml.model",
        ),
        (
            "no-scores.gguf",
            vec![
                ("tokenizer.ggml.model", Value::String("llama".into())),
                ("tokenizer.ggml.tokens", tokens.clone()),
            ],
            "tokenizer.ggml.scores",
        ),
        (
            "short-scores.gguf",
            vec![
                ("tokenizer.ggml.model", Value::String("llama".into())),
                ("tokenizer.ggml.tokens", tokens.clone()),
                (
                    "tokenizer.ggml.scores",
                    Value::Array(vec![Value::F32(0.0); 2]),
                ),
            ],
            "tokenizer.ggml.scores",
        ),
        (
            "bos-out-of-range.gguf",
            vec![
                ("tokenizer.ggml.model", Value::String("llama".into())),
                ("tokenizer.ggml.tokens", tokens.clone()),
                ("tokenizer.ggml.scores", scores.clone()),
                ("tokenizer.ggml.bos_token_id", Value::U32(99)),
            ],
            "tokenizer.ggml.bos_token_id",
        ),
        (
            "tokens-not-strings.gguf",
            vec![
                ("tokenizer.ggml.model", Value::String("llama".into())),
                ("tokenizer.ggml.tokens", Value::Array(vec![Value::U32(1)])),
            ],
            "tokenizer.ggml.tokens",
        ),
        (
            "bad-merge.gguf",
            vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
                ("tokenizer.ggml.merges", strings(&["ab"])),
            ],
            "tokenizer.ggml.merges",
        ),
    ];
    for (name, metadata, key) in cases {
        let path = write_gguf(&dir, name, &metadata);
        let err = Tokenizer::from_gguf_file(&path).unwrap_err();
        match &err {
            Error::Corrupt { path: p, what } => {
                assert_eq!(p, &path, "{name}");
                assert!(what.contains(key), "{name}: {what}");
            }
            other => panic!("{name}: expected Error::Corrupt, got {other:?}"),
        }
    }

    // A well-formed miniature SentencePiece vocabulary builds and tokenizes.
    let path = write_gguf(
        &dir,
        "mini-llama.gguf",
        &[
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                strings(&["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁ab"]),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(
                    [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
                        .map(Value::F32)
                        .to_vec(),
                ),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array([2, 3, 3, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ],
    );
    let tok = Tokenizer::from_gguf_file(&path).unwrap();
    assert_eq!(tok.encode("ab", true).unwrap(), [1, 7]);
    assert_eq!(tok.encode("ab ba", false).unwrap(), [7, 3, 5, 4]);
    assert_eq!(tok.decode(&[1, 7, 3, 5, 4], true).unwrap(), "ab ba");
}

#[test]
fn missing_gguf_is_an_io_error() {
    let path = fixture("gguf/no-such-file.gguf");
    let err = Tokenizer::from_gguf_file(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path: p, .. } if p == &path),
        "{err:?}"
    );
}
