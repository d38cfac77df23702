#!/usr/bin/env bash
# Prompt processing and decoding against llama.cpp on the same files, same machine, alternating,
# ROUNDS times (default 2): llama.cpp's `llama-bench -p 512 -n 64` (pp512, tg64) and ours
# (examples bench_prefill: 512-token prompt, batch 1, and 8 prompts x 64 new tokens batched;
# bench_decode: 64 new tokens, batch 1). Files: the SmolLM2 Q4_1 GGUF of
# scripts/fetch-smollm2.sh and its F32, Q8_0 and Q4_K_M requantizations by llama-quantize.
# Ours reads each file kept in its GGML types (`gguf-kept`); "f32" is our dense f32 base.
#
#   scripts/bench-vs-llamacpp.sh [ROUNDS]     # THREADS=2 by default; JSON lines to $OUT_JSONL
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
threads="${THREADS:-2}"
out="${OUT_JSONL:-bench-vs-llamacpp.jsonl}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
export RAYON_NUM_THREADS="$threads"
llama="$(scripts/llamacpp-build.sh)"
q41="$(scripts/fetch-smollm2.sh)"
dir="$(dirname "$q41")"
for t in F32 Q8_0 Q4_K_M; do
  f="$dir/SmolLM2-135M-Instruct.$t.gguf"
  [ -f "$f" ] || "$llama/llama-quantize" --allow-requantize "$q41" "$f" "$t" >/dev/null 2>&1
done
cargo build -q --release -p peft_prelude --example bench_prefill --example bench_decode
bin="$CARGO_TARGET_DIR/release/examples"
: >"$out"
record() { # label, json
  echo "{\"run\":\"$1\",\"result\":$2}" | tee -a "$out"
}
for r in $(seq "$rounds"); do
  echo "== round $r of $rounds" >&2
  for t in Q4_1 F32 Q8_0 Q4_K_M; do
    f="$dir/SmolLM2-135M-Instruct.$t.gguf"
    record "llamacpp-$t" "$("$llama/llama-bench" -m "$f" -t "$threads" -p 512 -n 64 -r 3 -o jsonl 2>/dev/null | tr '\n' ',' | sed 's/^/[/; s/,$/]/')"
    base=gguf-kept
    [ "$t" = F32 ] && base=dense-f32
    while read -r line; do record "ours-$t" "$line"; done \
      < <("$bin/bench_prefill" "$f" "$base" 512 3)
    record "ours-$t" "$("$bin/bench_decode" "$f" 64 3 "$base" | tail -1)"
  done
done
python3 - "$out" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(xs): return statistics.median(xs) if xs else float("nan")
print(f"\n{'file':8} {'pp512 ours':>11} {'llama.cpp':>10} {'ratio':>6} | {'tg64 ours':>10} {'llama.cpp':>10} {'ratio':>6} | {'8x64 batched':>12} {'one by one':>10}")
for t in ["Q4_1", "F32", "Q8_0", "Q4_K_M"]:
    ours = [r["result"] for r in rows if r["run"] == f"ours-{t}"]
    ll = [x for r in rows if r["run"] == f"llamacpp-{t}" for x in r["result"]]
    pp = med([o["prompt_tokens_per_s_median"] for o in ours if o["bench"] == "prefill"])
    tg = med([o["decode_tokens_per_s_median"] for o in ours if o["bench"] == "greedy_decode"])
    bt = med([o["batched_tokens_per_s_median"] for o in ours if o["bench"] == "batched_generation"])
    b1 = med([o["one_by_one_tokens_per_s_median"] for o in ours if o["bench"] == "batched_generation"])
    lpp = med([x["avg_ts"] for x in ll if x["n_prompt"] > 0])
    ltg = med([x["avg_ts"] for x in ll if x["n_gen"] > 0])
    print(f"{t:8} {pp:11.1f} {lpp:10.1f} {pp/lpp:5.2f}x | {tg:10.1f} {ltg:10.1f} {tg/ltg:5.2f}x | {bt:12.1f} {b1:10.1f}")
EOF
