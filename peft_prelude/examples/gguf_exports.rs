//! The consumer check of our GGUF exports: exports a model as F16, Q8_0 and Q4_K_M, reads
//! each file back in both of our ways (dequantized to f32, and kept in its types as decoding
//! runs it) and, given llama.cpp's `llama-completion`, runs llama.cpp on the same file, then
//! compares the greedy continuations of a few prompts. One JSON line per file and prompt.
//!
//!   cargo run --release -p peft_prelude --example gguf_exports -- MODEL OUT_DIR [--llama BIN] [--tokens N]
//!
//! MODEL is a GGUF or a Hugging Face directory; OUT_DIR receives `model.{TYPE}.gguf`. Where
//! llama.cpp's text departs from ours, the line gives the step and our margin there (the logit
//! gap between our top two tokens, computed exactly on the file's weights): a departure at a
//! near-tie is the two programs' rounding (llama.cpp multiplies 8-bit activations), not a
//! wrong file. `scripts/llamacpp-check.sh` builds llama.cpp and runs this.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Tensor;
use peft_prelude::generate::{generate_ids, GenerationConfig, Hooks};
use peft_prelude::model::{CausalLm, Forward, LoadOptions, Pretrained};
use peft_prelude::quant::export::{gguf_file_in, save_gguf, GgufExport};
use peft_prelude::quant::Quantization;
use serde_json::json;

const PROMPTS: [&str; 4] = [
    "The history of computing began with",
    "Here is a simple recipe for pancakes:",
    "The three largest cities in France are",
    "def fibonacci(n):",
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut positional, mut llama, mut tokens) = (vec![], None, 24usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--llama" => llama = Some(PathBuf::from(args.next().unwrap_or_default())),
            "--tokens" => tokens = args.next().unwrap_or_default().parse()?,
            _ => positional.push(a),
        }
    }
    let [source, out] = positional.as_slice() else {
        anyhow::bail!("usage: gguf_exports MODEL OUT_DIR [--llama llama-completion] [--tokens N]");
    };
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let original = Pretrained::load(source, &LoadOptions::default())?;
    let config = GenerationConfig {
        eos_token_ids: vec![],
        ..GenerationConfig::default().greedy(tokens)
    };
    let greedy = |p: &Pretrained, prompt: &str| -> anyhow::Result<String> {
        let ids = p.tokenizer.encode(prompt, true)?;
        let g = generate_ids(&p.model, &p.tokenizer, &[ids], &config, Hooks::default())?;
        Ok(g.texts[0].clone())
    };
    let mut failures = 0;
    for kind in [GgufExport::F16, GgufExport::Q8_0, GgufExport::Q4KM] {
        let path = gguf_file_in(&out, kind);
        save_gguf(&original.model, &path, kind, &original.tokenizer)?;
        let load = |q: Quantization| {
            Pretrained::from_gguf(&path, &LoadOptions::default().with_quantization(q))
        };
        let (exact, kept) = (load(Quantization::None)?, load(Quantization::KeepGguf)?);
        for prompt in PROMPTS {
            let ours_f32 = greedy(&exact, prompt)?;
            let ours_kept = greedy(&kept, prompt)?;
            let mut line = json!({
                "type": kind.name(), "prompt": prompt,
                "ours_f32": ours_f32, "ours_kept": ours_kept,
                "f32_equals_kept": ours_f32 == ours_kept,
            });
            if let Some(bin) = &llama {
                let theirs = llama_completion(bin, &path, prompt, tokens)?;
                let same = theirs == ours_kept || theirs == ours_f32;
                line["llama_cpp"] = json!(theirs);
                line["llama_cpp_equals_ours"] = json!(same);
                if !same {
                    // Where and how narrowly the texts part, in our exact arithmetic.
                    let common = common_prefix(&theirs, &ours_f32);
                    // Back to the start of the word they part in (tokens carry their space).
                    let cut = theirs[..common].rfind(char::is_whitespace).unwrap_or(0);
                    let margin = top_two_gap(&exact, &format!("{prompt}{}", &theirs[..cut]))?;
                    line["departs_after_chars"] = json!(common);
                    line["our_margin_there"] = json!(margin);
                    // A tie within the quantization's rounding is not a wrong file; F16 must
                    // agree everywhere.
                    if kind == GgufExport::F16 || margin > 0.5 {
                        failures += 1;
                    }
                }
            }
            println!("{line}");
        }
    }
    if failures > 0 {
        anyhow::bail!("{failures} continuations of llama.cpp depart from ours at a clear margin");
    }
    Ok(())
}

/// llama.cpp's greedy continuation of `prompt` (its weight repacking off: the AMX path of
/// llama.cpp 0.94 crashes on some Xeons).
fn llama_completion(bin: &Path, model: &Path, prompt: &str, n: usize) -> anyhow::Result<String> {
    let output = Command::new(bin)
        .args([
            "-m",
            &model.to_string_lossy(),
            "-t",
            "2",
            "-c",
            "512",
            "-n",
            &n.to_string(),
        ])
        .args([
            "--temp",
            "0",
            "-no-cnv",
            "--simple-io",
            "--no-repack",
            "-p",
            prompt,
        ])
        .stdin(std::process::Stdio::null())
        .output()?;
    if !output.status.success() {
        anyhow::bail!(
            "{} failed ({}): {}",
            bin.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    // It echoes the prompt, then the continuation, then two newlines.
    let text = text.strip_prefix(prompt).unwrap_or(&text);
    Ok(text.strip_suffix("\n\n").unwrap_or(text).to_string())
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .take_while(|((_, x), y)| x == y)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8())
}

/// Our logit gap between the best and second-best next token after `text`.
fn top_two_gap(p: &Pretrained, text: &str) -> anyhow::Result<f32> {
    let ids = p.tokenizer.encode(text, true)?;
    let input = Tensor::new(ids.as_slice(), p.model.device())?.unsqueeze(0)?;
    let mut row = p
        .model
        .last_logits(Forward::ids(&input))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    row.sort_by(|a, b| b.total_cmp(a));
    Ok(row[0] - row[1])
}
