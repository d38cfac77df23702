#!/usr/bin/env bash
# llama.cpp as the consumer of our GGUF exports: builds llama.cpp's llama-completion
# (scripts/llamacpp-build.sh: ~8 minutes on 2 cores the first time), exports SmolLM2 as F16, Q8_0 and Q4_K_M, and
# compares llama.cpp's greedy continuations of four prompts with ours (examples/gguf_exports.rs).
# Outside CI (the build is slow). Exits non-zero when llama.cpp departs from us at a clear margin.
#
#   scripts/llamacpp-check.sh [MODEL]     # default: the SmolLM2 GGUF of scripts/fetch-smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
bin="$(scripts/llamacpp-build.sh)/llama-completion"
model="${1:-$(scripts/fetch-smollm2.sh)}"
out="${TMPDIR:-/tmp}/peft-llamacpp-check"
cargo run --release -q -p peft_prelude --example gguf_exports -- "$model" "$out" --llama "$bin"
