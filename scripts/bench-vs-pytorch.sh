#!/usr/bin/env bash
# Issue 8's side-by-side benchmark: our LoRA step, QLoRA step and greedy decoding against
# PyTorch + transformers + peft on the same machine, alternating, ROUNDS times (default 2).
#
#   scripts/bench-vs-pytorch.sh [ROUNDS]      # ONLY=train or ONLY=decode runs one half
#
# Ours: the example binaries bench_lora_step and bench_decode (release build). PyTorch: the
# reference scripts in ../shared/bench (set up once per machine as its README says; REF points
# at that folder, default ~/.cache/peft-reference). Every run prints one JSON line; all lines
# go to $OUT_JSONL (default bench-vs-pytorch.jsonl in the current folder) and a table of
# medians and ratios is printed at the end. Model: SmolLM2-135M-Instruct (scripts/fetch-smollm2.sh),
# LoRA r=16 alpha=16 on q,k,v,o,gate,up,down, AdamW lr 2e-4, f32, batch 4 x 256,
# 2 warm-up + 8 timed steps, 2 threads; decoding: 64 new tokens, batch 1, KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
REF="${REF:-$HOME/.cache/peft-reference}"
bench="${BENCH_DIR:-$(cd .. && pwd)/shared/bench}"
out="${OUT_JSONL:-bench-vs-pytorch.jsonl}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
export RAYON_NUM_THREADS=2
scripts/fetch-smollm2.sh >/dev/null
cargo build -q --release -p peft_prelude --example bench_lora_step --example bench_decode
bin="$CARGO_TARGET_DIR/release/examples"
py="$REF/venv/bin/python"
if [ ! -x "$py" ] || [ ! -d "$REF/smollm2-135m-hf" ]; then
  echo "no reference setup in $REF (see $bench/README.md); running ours only" >&2
  py=""
fi
: >"$out"
run() { # label, command...
  local label="$1"; shift
  local line
  line="$("$@" | tail -1)"
  echo "{\"run\":\"$label\",\"result\":$line}" | tee -a "$out"
}
for r in $(seq "$rounds"); do
  echo "== round $r of $rounds" >&2
  if [ "${ONLY:-train}" = train ]; then
  run ours-lora-f32 "$bin/bench_lora_step"
  run ours-lora-f32-checkpointed "$bin/bench_lora_step" --gradient-checkpointing
  run ours-qlora-gguf-q4_1 "$bin/bench_lora_step" --base gguf-kept --gradient-checkpointing
  run ours-qlora-nf4 "$bin/bench_lora_step" --base nf4 --gradient-checkpointing
  run ours-qlora-nf4-no-checkpointing "$bin/bench_lora_step" --base nf4
  run ours-qlora-nf4-checkpoint-12-layers "$bin/bench_lora_step" --base nf4 --checkpoint-layers 12
  run ours-qlora-nf4-exact-no-checkpointing "$bin/bench_lora_step" --base nf4 --integer-products off
  if [ -n "$py" ]; then
    run pytorch-lora-f32 "$py" "$bench/hf_lora_bench.py" --model "$REF/smollm2-135m-hf" \
      --batch 4 --seq 256 --steps 8 --threads 2
  fi
  fi
  if [ "${ONLY:-decode}" = decode ]; then
  run ours-decode-f32 "$bin/bench_decode" "" 64 3 dense-f32
  run ours-decode-gguf-q4_1 "$bin/bench_decode" "" 64 3 gguf-kept
  if [ -n "$py" ]; then
    run pytorch-decode-f32 "$py" "$bench/hf_lora_bench.py" --model "$REF/smollm2-135m-hf" \
      --mode infer --threads 2
  fi
  fi
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    runs.setdefault(d["run"], []).append(d["result"])
def med(label, *keys):
    vals = []
    for r in runs.get(label, []):
        for k in keys:
            if k in r:
                vals.append(r[k]); break
    return statistics.median(vals) if vals else None
ref_train = med("pytorch-lora-f32", "tokens_per_s")
ref_rss = med("pytorch-lora-f32", "peak_rss_mb")
# The issue's yardstick for decoding is transformers' generate().
ref_dec = med("pytorch-decode-f32", "hf_generate_tokens_per_s", "decode_tokens_per_s")
if ref_dec:
    print(f"PyTorch generate(): {ref_dec:.2f} tokens/s (its own decode loop: {med('pytorch-decode-f32', 'decode_tokens_per_s')})")
print("| run | tokens/s (median) | peak RSS MB | vs PyTorch (f32 LoRA step / generate) |")
print("|---|---|---|---|")
for label in runs:
    tps = med(label, "decode_tokens_per_s_median", "decode_tokens_per_s", "tokens_per_s")
    rss = med(label, "peak_rss_mb")
    ref = ref_dec if "decode" in label else ref_train
    ratio = f"{tps / ref:.2f}x" if tps and ref else "-"
    if rss and ref_rss and "decode" not in label:
        ratio += f", RSS {rss / ref_rss:.2f}x"
    print(f"| {label} | {tps:.1f} | {rss if rss is None else round(rss)} | {ratio} |")
PY
