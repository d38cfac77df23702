#!/usr/bin/env bash
# The main job, on a fresh machine: fetch the small CPU model, build and install the Jupyter
# kernel "Rust (PEFT)" (warming its build cache), then execute notebooks/mistral_lora.ipynb
# headlessly (outputs into notebooks/outputs/), or open it in JupyterLab with --lab.
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
scripts/install-kernel.sh --user
mkdir -p notebooks/outputs
cd notebooks
"$CARGO_TARGET_DIR/debug/peft-kernel" run mistral_lora.ipynb --out outputs/mistral_lora.ipynb
echo "executed notebook: notebooks/outputs/mistral_lora.ipynb"
