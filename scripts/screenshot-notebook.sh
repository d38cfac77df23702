#!/usr/bin/env bash
# Remakes docs/mistral_lora.png: the executed notebooks/mistral_lora.ipynb open in JupyterLab,
# scrolled to the training cell (loss curve), captured with headless Chromium.
#
# Needs: JupyterLab in the Python at $PY (default ~/.cache/peft-venv/bin/python; `pip install
# jupyterlab`), Debian's chromium (`apt-get install chromium`). Serves on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$HOME/.cache/peft-venv/bin/python}"
PORT="${PORT:-8899}"
out="docs/mistral_lora.png"
mkdir -p docs
work="$(mktemp -d)"
mkdir -p "$work/root" "$work/settings/@jupyterlab/apputils-extension"
# No "official Jupyter news?" prompt over the picture.
echo '{"fetchNews": "false"}' >"$work/settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
trap 'kill "$lab" 2>/dev/null || true; rm -rf "$work"' EXIT
# A copy whose first cells are collapsed, so the loss curve is on the first screen.
"$PY" - "$work" <<'PYEOF'
import json, sys
nb = json.load(open("notebooks/mistral_lora.ipynb"))
cells, seen_train = [], False
for c in nb["cells"]:
    src = "".join(c["source"])
    if "trainer.train()" in src:
        seen_train = True
    if seen_train or c["cell_type"] == "markdown" and src.startswith("# "):
        cells.append(c)
    if seen_train and len(cells) > 4:
        break
nb["cells"] = cells
json.dump(nb, open(f"{sys.argv[1]}/root/mistral_lora.ipynb", "w"))
PYEOF
# Outputs of untrusted notebooks are not rendered as SVG by JupyterLab: sign the copy.
"$(dirname "$PY")/jupyter-trust" "$work/root/mistral_lora.ipynb" >/dev/null
JUPYTERLAB_SETTINGS_DIR="$work/settings" "$PY" -m jupyterlab --no-browser --ip=127.0.0.1 --port="$PORT" \
  --ServerApp.token='' --ServerApp.password='' --ServerApp.root_dir="$work/root" \
  --allow-root --LabApp.news_url=None --ServerApp.disable_check_xsrf=True >"$work/lab.log" 2>&1 &
lab=$!
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$PORT/lab" >/dev/null && break
  sleep 1
done
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/chrome" --hide-scrollbars --window-size=1400,1500 \
  --virtual-time-budget=25000 --screenshot="$out" \
  "http://127.0.0.1:$PORT/lab/tree/mistral_lora.ipynb" 2>/dev/null
echo "wrote $out"
