#!/usr/bin/env bash
# The main job, on a fresh machine: fetch the small CPU model, build and install the Jupyter
# kernel "Rust (PEFT)", then execute notebooks/mistral_lora.ipynb headlessly (outputs into
# notebooks/outputs/; the first time also compiles the prelude into the kernel's build cache),
# or open it in JupyterLab with --lab.
#
#   scripts/run.sh          # execute the notebook, write notebooks/outputs/mistral_lora.ipynb
#   scripts/run.sh --lab    # open it in JupyterLab, which scripts/lab-env.sh sets up in
#                           # ~/.cache/peft-lab with the widget manager (jupyterlab_widgets)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
scripts/fetch-smollm2.sh >/dev/null
if [ "${1:-}" = "--lab" ]; then
  py="$(scripts/lab-env.sh)"
  shift
  exec "$py" -m jupyterlab notebooks/mistral_lora.ipynb "$@"
fi
# The run below compiles the prelude into the kernel's cache itself: a separate warm-up would
# start (and type-check in) a second evcxr session first, ~13 s of the first run.
scripts/install-kernel.sh --user --no-warm
mkdir -p notebooks/outputs
cd notebooks
"$CARGO_TARGET_DIR/debug/peft-kernel" run mistral_lora.ipynb --out outputs/mistral_lora.ipynb
echo "executed notebook: notebooks/outputs/mistral_lora.ipynb"
