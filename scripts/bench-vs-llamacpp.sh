#!/usr/bin/env bash
# Prompt processing and decoding against llama.cpp on the same files, same machine, alternating,
# ROUNDS times (default 2): llama.cpp's `llama-bench -p 512 -n 64` (pp512, tg64) and ours
# (examples bench_prefill: 512-token prompt, batch 1, and 8 prompts x 64 new tokens batched;
# bench_decode: 64 new tokens, batch 1). Files: the SmolLM2 Q4_1 GGUF of
# scripts/fetch-smollm2.sh and its F32, Q8_0 and Q4_K_M requantizations by llama-quantize.
# Ours reads each file kept in its GGML types (`gguf-kept`); "f32" is our dense f32 base.
# LLAMA_BINS: the llama.cpp builds to compare with (bin folders, space-separated; default the
# one scripts/llamacpp-build.sh makes). A llama-bench that fails is recorded as null.
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
bins="${LLAMA_BINS:-$llama}"
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
    for b in $bins; do
      for test in "-p 512 -n 0" "-p 0 -n 64"; do  # apart, so that one crashing spares the other
        # shellcheck disable=SC2086
        res="$("$b/llama-bench" -m "$f" -t "$threads" $test -r 3 -o jsonl 2>/dev/null || true)"
        [ -n "$res" ] || res=null
        record "llamacpp-$t" "{\"build\":\"$b\",\"tests\":[$res]}"
      done
    done
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
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")
print(f"\n{'file':7} {'pp512 ours':>10} {'tg64 ours':>9} {'8x64 batched':>12} {'one by one':>10}")
for t in ["Q4_1", "F32", "Q8_0", "Q4_K_M"]:
    ours = [r["result"] for r in rows if r["run"] == f"ours-{t}"]
    pick = lambda bench, key: med([o[key] for o in ours if o["bench"] == bench])
    pp = pick("prefill", "prompt_tokens_per_s_median")
    tg = pick("greedy_decode", "decode_tokens_per_s_median")
    bt = pick("batched_generation", "batched_tokens_per_s_median")
    b1 = pick("batched_generation", "one_by_one_tokens_per_s_median")
    print(f"{t:7} {pp:10.1f} {tg:9.1f} {bt:12.1f} {b1:10.1f}")
    builds = {}
    for r in rows:
        if r["run"] == f"llamacpp-{t}":
            builds.setdefault(r["result"]["build"], []).extend(x for x in r["result"]["tests"] if x)
    for b, tests in builds.items():
        lpp = med([x["avg_ts"] for x in tests if x["n_prompt"] > 0])
        ltg = med([x["avg_ts"] for x in tests if x["n_gen"] > 0])
        print(f"  llama.cpp {b}: pp512 {lpp:.1f} (ours {pp / lpp:.2f}x), tg64 {ltg:.1f} (ours {tg / ltg:.2f}x)")
EOF
