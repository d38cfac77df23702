//! Exports each tiny family model of `tests/fixtures/families` as GGUF (F16 and Q8_0) into a
//! folder, with our logits of the fixture input read back from each file, for
//! `scripts/llamacpp-families-check.sh` to compare with llama.cpp's on the same files.
//!
//! `cargo run --release --example export_families -- OUT_DIR`

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use peft_prelude::model::load::load_model_from_dir;
use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::quant::export::{save_gguf, GgufExport};
use peft_prelude::tokenizer::Tokenizer;

fn main() -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("OUT_DIR"));
    std::fs::create_dir_all(&out)?;
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/families");
    for family in ["llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let dir = fixtures.join(family);
        let model = load_model_from_dir(&dir, &LoadOptions::default())?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
        let reference = candle_core::safetensors::load(
            dir.join("reference.safetensors"),
            &candle_core::Device::Cpu,
        )?;
        let ids = reference["a.input_ids"].to_dtype(DType::U32)?;
        for (kind, name) in [(GgufExport::F16, "f16"), (GgufExport::Q8_0, "q8_0")] {
            let path = out.join(format!("{family}-{name}.gguf"));
            save_gguf(&model, &path, kind, &tokenizer)?;
            let back = Pretrained::from_gguf(&path, &LoadOptions::default())?;
            let logits: Tensor = back.model.forward(&ids)?;
            let mut t = HashMap::new();
            t.insert("a.logits".to_string(), logits);
            t.insert("a.input_ids".to_string(), reference["a.input_ids"].clone());
            candle_core::safetensors::save(
                &t,
                out.join(format!("{family}-{name}.ours.safetensors")),
            )?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
