#!/usr/bin/env bash
# Builds the GPU check binary on a machine WITHOUT a GPU (or without cargo on the GPU
# machine's side): real nvcc 13.0 from PyPI wheels for the PTX, link-only stub libraries for
# libcuda/cuBLAS/cuRAND/NVRTC (the binary loads the real ones on the GPU machine by soname).
#
#   scripts/gpu-build.sh [OUT_DIR]     # writes OUT_DIR/gpu_check.xz (default: .gpu-bundle)
#
# Then, on the GPU machine: scripts/gpu-check.sh --prebuilt OUT_DIR/gpu_check.xz
# Compute capability: CUDA_COMPUTE_CAP (default 90, Hopper). The first build compiles
# candle's CUDA kernels (~15-20 min on 2 cores); later builds reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.gpu-bundle}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
# The PTX must not be newer than what the GPU machine's driver can JIT: CUDA 13.0 for the
# R580 drivers (a 13.4 build fails there with CUDA_ERROR_UNSUPPORTED_PTX_VERSION). Override
# with CUDA_WHEELS_VERSION=13.4.92 (and CUDARC_CUDA_VERSION=13040) for newer drivers.
ver="${CUDA_WHEELS_VERSION:-13.0.88}"
venv="$cache/cuda-nvcc-$ver"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import nvidia' 2>/dev/null; then
  python3 -m venv "$venv"
  minor="${ver%.*}"
  "$venv/bin/pip" install -q "nvidia-cuda-nvcc==$ver" "nvidia-cuda-runtime==$minor.*" \
    "nvidia-cuda-crt==$ver" "nvidia-nvvm==$ver" "nvidia-cuda-cccl==$minor.*"
fi
CUDA_HOME="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
ln -sfn lib "$CUDA_HOME/lib64"
ln -sfn libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"

# Link-only stubs generated from cudarc's own bindings (every function empty).
stubs="$cache/cuda-stubs"
if [ ! -f "$stubs/libcublasLt.so" ]; then
  cargo fetch -q
  src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)"
  mkdir -p "$stubs"
  for spec in driver:cuda:1 nvrtc:nvrtc:13 cublas:cublas:13 cublaslt:cublasLt:13 curand:curand:10; do
    IFS=: read -r mod lib ver <<<"$spec"
    grep -oP '^pub unsafe fn \K[A-Za-z0-9_]+' "$src/src/$mod/sys/mod.rs" | sort -u |
      sed 's/.*/void &(void){}/' >"$stubs/$lib.c"
    gcc -shared -fPIC -Wl,-soname,"lib$lib.so.$ver" -o "$stubs/lib$lib.so" "$stubs/$lib.c"
  done
fi

export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" LIBRARY_PATH="$stubs"
export CARGO_TARGET_DIR="$cache/peft-target-cuda"
t0=$SECONDS
cargo build --release -p peft_prelude --features cuda --example gpu_check
echo "gpu-build: cargo build took $((SECONDS - t0)) s" >&2
mkdir -p "$out"
strip -o "$out/gpu_check" "$CARGO_TARGET_DIR/release/examples/gpu_check"
xz -T2 -6 -f "$out/gpu_check"
ls -la "$out"
