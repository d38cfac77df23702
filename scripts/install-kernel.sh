#!/usr/bin/env bash
# Builds the Jupyter kernel "Rust (PEFT)", registers it with Jupyter and warms its build cache
# (the first time compiles candle and the prelude for evcxr: several minutes).
#
#   scripts/install-kernel.sh                # for this user
#   scripts/install-kernel.sh --sys-prefix   # into the active Python environment
#   then: jupyter lab notebooks/mistral_lora.ipynb   (pick the kernel "Rust (PEFT)")
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
cargo build -p peft-kernel
"$CARGO_TARGET_DIR/debug/peft-kernel" install "$@"
