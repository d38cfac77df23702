#!/usr/bin/env bash
# The GPU check, one command for a GPU machine (no network needed):
#
#   scripts/gpu-check.sh                  # build with --features cuda (needs cargo, nvcc and the
#                                         # crates already fetched), then run the check below
#   scripts/gpu-check.sh --prebuilt F     # run a binary made elsewhere by scripts/gpu-build.sh
#                                         # (F = gpu_check or gpu_check.xz): for GPU machines
#                                         # without a Rust toolchain
#   scripts/gpu-check.sh --cpu            # the same checks on the CPU, with a tiny model (CI)
#
# The check: every fused CUDA op (RMSNorm, RoPE, SwiGLU, LoRA linear, NF4 linear, chunked
# cross-entropy; forward and backward) in f32 and bf16 against the CPU implementation, NF4
# dequantization bit-exact with the CPU's, then a QLoRA training benchmark on a
# Mistral-7B-shaped model with random weights (NF4 base, LoRA r=16 on all seven projections,
# batch 2, sequence 2048, 10 steps) printed as one JSON line, plus the peak GPU memory that
# nvidia-smi saw. Extra arguments go to the binary (e.g. --steps 5, --no-bench, --bench-only).
# Exits non-zero on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
offline=()
if [ -d "${CARGO_HOME:-$HOME/.cargo}/registry/cache" ]; then offline=(--offline); fi

if [ "${1:-}" = "--cpu" ]; then
  shift
  # The dev profile (dependencies optimised, see Cargo.toml) shares CI's test build.
  cargo run "${offline[@]}" -p peft_prelude --example gpu_check -- --cpu "$@"
  exit 0
fi

t0=$SECONDS
if [ "${1:-}" = "--prebuilt" ]; then
  bin="$2"
  shift 2
  if [[ "$bin" == *.xz ]]; then
    xz -dc "$bin" >/tmp/gpu_check && chmod +x /tmp/gpu_check && bin=/tmp/gpu_check
  fi
  # The binary loads cuBLAS/cuRAND/NVRTC/cudart 13 by soname: use the CUDA toolkit's, or the
  # ones PyTorch's CUDA 13 wheels ship.
  libs="$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' -o -name 'libcudart.so.13' -o -name 'libcublasLt.so.13' \) 2>/dev/null |
    xargs -r -n1 dirname | sort -u | paste -sd:)"
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  # candle-kernels and our build.rs read the compute capability from nvidia-smi when unset.
  if [ -z "${CUDA_COMPUTE_CAP:-}" ] && command -v nvidia-smi >/dev/null; then
    CUDA_COMPUTE_CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
    export CUDA_COMPUTE_CAP
  fi
  cargo build "${offline[@]}" --release -p peft_prelude --features cuda --example gpu_check
  bin="$CARGO_TARGET_DIR/release/examples/gpu_check"
fi
echo "gpu-check: build/unpack took $((SECONDS - t0)) s" >&2

# Peak device memory as the driver sees it, sampled every 100 ms while the check runs.
log="$(mktemp)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" 2>/dev/null &
smi=$!
trap 'kill $smi 2>/dev/null || true; rm -f "$log"' EXIT
t1=$SECONDS
"$bin" "$@"
kill $smi 2>/dev/null || true
peak="$(sort -n "$log" | tail -1)"
echo "{\"gpu_check_seconds\":$((SECONDS - t1)),\"nvidia_smi_peak_memory_mib\":${peak:-null}}"
