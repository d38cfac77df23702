#!/usr/bin/env bash
# CI's check of the CUDA path on a machine without a GPU or a CUDA toolkit (see
# /work/shared/notes/cuda.md and kernels/README.md):
#
#   1. `cargo clippy -p peft-kernels` and `cargo clippy -p peft_prelude --lib --examples` (the GPU
#      check included), `--features cuda`, with a stub nvcc (recipe A):
#      type-checks every CUDA launcher against candle's and cudarc's real APIs. The stub writes
#      empty PTX, so this build must never run: it has its own target dir.
#   2. `nvcc --ptx` of every kernels/cuda/*.cu for sm_80 and sm_90 with the real nvcc 13.4 from
#      PyPI wheels (recipe B), pinned, in a venv under ~/.cache: checks the kernels themselves.
#
#   scripts/cuda-check.sh            # both
#   scripts/cuda-check.sh --rust     # only 1
#   scripts/cuda-check.sh --ptx      # only 2
# Prints the time of each step. Needs crates.io (first run) and PyPI (first run of step 2).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}"

rust_check() {
  local stub="$cache/fake-nvcc/bin"
  mkdir -p "$stub"
  cat > "$stub/nvcc" <<'STUB'
#!/bin/sh
# Stub nvcc for `cargo check` only: claims CUDA 13.4, writes empty PTX/objects/archives.
case "$*" in
  *--version*) printf 'nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.4, V13.4.92\n'; exit 0;;
  *--list-gpu-code*) echo sm_80; echo sm_90; exit 0;;
esac
out=""; outdir=""; lib=0; srcs=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift;;
    --output-directory) outdir="$2"; shift;;
    --lib) lib=1;;
    *.cu) srcs="$srcs $1";;
  esac
  shift
done
if [ $lib = 1 ]; then rm -f "$out"; ar rcs "$out"; exit 0; fi
if [ -n "$out" ]; then : > "$out"; exit 0; fi
for s in $srcs; do b=$(basename "$s" .cu); : > "$outdir/$b.ptx"; done
STUB
  chmod +x "$stub/nvcc"
  local t0=$SECONDS
  env -u CUDA_HOME -u NVCC PATH="$stub:$PATH" CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13040 \
    CARGO_TARGET_DIR="$cache/peft-target-cuda-check" \
    cargo clippy -p peft-kernels --features cuda --all-targets -- -D warnings
  echo "cuda-check: cargo clippy -p peft-kernels --features cuda (stub nvcc) took $((SECONDS - t0)) s"
  # The prelude with `cuda` forwarded to candle and to peft-kernels: the whole CUDA path.
  t0=$SECONDS
  env -u CUDA_HOME -u NVCC PATH="$stub:$PATH" CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13040 \
    CARGO_TARGET_DIR="$cache/peft-target-cuda-check" \
    cargo clippy -p peft_prelude --features cuda --lib --examples -- -D warnings
  echo "cuda-check: cargo clippy -p peft_prelude --features cuda --lib --examples (stub nvcc) took $((SECONDS - t0)) s"
}

ptx_check() {
  local venv="$cache/cuda-nvcc-13.4.92"
  local t0=$SECONDS
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import nvidia' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q nvidia-cuda-nvcc==13.4.92 nvidia-cuda-runtime==13.4.92 \
      nvidia-cuda-crt==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-cccl==13.3.5.0.6
  fi
  local home
  home="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
  local out
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' RETURN
  "$home/bin/nvcc" --version | tail -1
  for arch in sm_80 sm_90; do
    for cu in kernels/cuda/*.cu; do
      "$home/bin/nvcc" --ptx -arch="$arch" -std=c++17 -O3 -Werror all-warnings \
        -o "$out/$(basename "$cu" .cu).$arch.ptx" "$cu"
    done
  done
  # Every extern "C" kernel the launchers ask for must be in the PTX: per dtype for the names
  # built with kname(), as written for the others (calls span lines, so whitespace goes first).
  local launchers; launchers="$(tr -d ' \n' < kernels/src/cuda.rs)"
  local wanted; wanted="$(
    grep -o 'get_or_load_custom_func(&kname("[a-z0-9_]*"' <<<"$launchers" | grep -o '"[a-z0-9_]*"' |
      tr -d '"' | sort -u | while read -r k; do printf '%s_f32\n%s_bf16\n%s_f16\n' "$k" "$k" "$k"; done
    grep -o 'get_or_load_custom_func("[a-z0-9_]*"' <<<"$launchers" | grep -o '"[a-z0-9_]*"' | tr -d '"'
  )"
  local k
  for k in $wanted; do
    grep -q "\.entry ${k}(" "$out"/*.sm_80.ptx || { echo "cuda-check: missing kernel ${k}" >&2; return 1; }
  done
  echo "cuda-check: all $(wc -w <<<"$wanted") kernels the launchers name are in the PTX"
  echo "cuda-check: nvcc --ptx of $(ls kernels/cuda/*.cu | wc -l) files x 2 archs took $((SECONDS - t0)) s"
}

case "$what" in
  all) rust_check; ptx_check;;
  --rust) rust_check;;
  --ptx) ptx_check;;
  *) echo "usage: $0 [--rust|--ptx]" >&2; exit 2;;
esac
