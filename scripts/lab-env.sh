#!/usr/bin/env bash
# Makes (once) the Python environment JupyterLab runs from, with what it needs to render our
# widgets (jupyterlab_widgets, the stock widget manager), and installs the kernel "Rust (PEFT)"
# into it. Prints the environment's python.
#
#   scripts/lab-env.sh              # ~/.cache/peft-lab (or $PEFT_LAB_VENV)
#   scripts/lab-env.sh playwright   # also the browser driver the browser check uses
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
venv="${PEFT_LAB_VENV:-$HOME/.cache/peft-lab}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  python3 -m venv "$venv" >&2
fi
packages=("jupyterlab>=4,<5" "jupyterlab_widgets>=3,<4")
if [ "${1:-}" = "playwright" ]; then
  packages+=("playwright>=1.40")
fi
# Quick when already there: pip only checks.
"$py" -m pip install -q --disable-pip-version-check "${packages[@]}" >&2
# PEFT_KERNEL_BUILT=1: the caller built the kernel (the test build's binary; a plain
# `cargo build -p peft-kernel` unifies other features and would rebuild evcxr for minutes).
[ "${PEFT_KERNEL_BUILT:-}" = 1 ] || cargo build -q -p peft-kernel >&2
PYTHON="$py" "$CARGO_TARGET_DIR/debug/peft-kernel" install --sys-prefix >&2
echo "$py"
