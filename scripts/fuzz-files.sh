#!/usr/bin/env bash
# The file fuzzer at full size: every file kind the prelude reads (GGUF, safetensors, configs,
# tokenizer.json, sharded indexes, adapters, datasets, checkpoints), mutated and loaded in child
# processes with a memory limit and a timeout; prints the table of outcomes (tests/fuzz_files).
# CI runs 400 cases per kind as part of `cargo test`.
#
#   scripts/fuzz-files.sh                 # 100000 cases per kind (hours on 2 cores)
#   scripts/fuzz-files.sh 5000 gguf,config
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
cases="${1:-100000}"
kinds="${2:-gguf,safetensors,config,tokenizer,sharded,adapter,dataset,checkpoint}"
cargo test --test fuzz_files -- --cases "$cases" --kinds "$kinds" 2>&1 | grep -v '^training\|^{'
