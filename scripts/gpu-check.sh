#!/usr/bin/env bash
# One command for a GPU machine (CUDA toolkit with nvcc on PATH or in CUDA_HOME, no network
# needed once the crates are vendored/fetched):
#
#   scripts/gpu-check.sh          # build with --features cuda, check every CUDA op (forward and
#                                 # backward) against its CPU implementation
#   scripts/gpu-check.sh --cpu    # the same checks of the CPU ops against candle compositions
#                                 # (no GPU, no CUDA toolkit; CI runs this)
#
# Exits non-zero on the first failing step. The QLoRA training benchmark is appended below
# (issue 7 §4) by whoever owns it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
offline=()
if [ -d "${CARGO_HOME:-$HOME/.cargo}/registry/cache" ]; then offline=(--offline); fi

if [ "${1:-}" = "--cpu" ]; then
  cargo run "${offline[@]}" --release -p peft-kernels --example gpu_check -- --cpu
  exit 0
fi

# candle-kernels and our build.rs read the compute capability from nvidia-smi when it is unset.
if [ -z "${CUDA_COMPUTE_CAP:-}" ] && command -v nvidia-smi >/dev/null; then
  CUDA_COMPUTE_CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
  export CUDA_COMPUTE_CAP
fi
t0=$SECONDS
cargo build "${offline[@]}" --release -p peft-kernels --features cuda --example gpu_check
echo "gpu-check: build took $((SECONDS - t0)) s" >&2
"$CARGO_TARGET_DIR/release/examples/gpu_check"
