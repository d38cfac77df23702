#!/usr/bin/env bash
# The browser check: JupyterLab with the stock widget manager (jupyterlab_widgets) executes
# notebooks/mistral_lora.ipynb in headless Chromium; scripts/browser_check.py asserts that the
# background run's panel is rendered (while it trains, after, and after a page reload) and
# writes docs/panel.png.
#
# Needs Debian's chromium (`apt-get install chromium`) and the SmolLM2 model
# (scripts/fetch-smollm2.sh); sets up the rest (scripts/lab-env.sh). Serves on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
PORT="${PORT:-8898}"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser)}"
scripts/fetch-smollm2.sh >/dev/null
# The kernel as the test run builds it (after scripts/test.sh, as in CI, nothing to do).
cargo test -q --workspace --no-run >/dev/null 2>&1 || cargo test --workspace --no-run
py="$(PEFT_KERNEL_BUILT=1 scripts/lab-env.sh playwright)"
work="$(mktemp -d)"
mkdir -p "$work/root" "$work/settings/@jupyterlab/apputils-extension" "$work/settings/@jupyterlab/notebook-extension" docs
echo '{"fetchNews": "false"}' >"$work/settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
# Every cell in the page (JupyterLab 4 otherwise renders only those in view).
echo '{"windowingMode": "none"}' >"$work/settings/@jupyterlab/notebook-extension/tracker.jupyterlab-settings"
trap 'kill "$lab" 2>/dev/null || true; sleep 1; rm -rf "$work"' EXIT
# A copy without outputs: the browser executes it.
"$py" - "$work/root/mistral_lora.ipynb" <<'PYEOF'
import json, sys
nb = json.load(open("notebooks/mistral_lora.ipynb"))
for c in nb["cells"]:
    if c["cell_type"] == "code":
        c["outputs"], c["execution_count"] = [], None
nb["metadata"].pop("widgets", None)
json.dump(nb, open(sys.argv[1], "w"), indent=1)
PYEOF
JUPYTERLAB_SETTINGS_DIR="$work/settings" "$py" -m jupyterlab --no-browser --ip=127.0.0.1 --port="$PORT" \
  --ServerApp.token='' --ServerApp.password='' --ServerApp.root_dir="$work/root" \
  --allow-root --LabApp.news_url=None --LabApp.expose_app_in_browser=True \
  --ServerApp.disable_check_xsrf=True >"$work/lab.log" 2>&1 &
lab=$!
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$PORT/lab" >/dev/null && break
  sleep 1
done
if ! "$py" scripts/browser_check.py "http://127.0.0.1:$PORT/lab/tree/mistral_lora.ipynb" "$CHROMIUM" docs; then
  echo "--- JupyterLab's log:" >&2
  tail -50 "$work/lab.log" >&2
  exit 1
fi
