#!/usr/bin/env bash
# Adapters and merged models crossing between us and Hugging Face's Python stack, on a real
# model (SmolLM2-135M, all seven projections, 30 layers):
#   1. a LoRA we train and save loads in PEFT and gives our logits; our 16-bit merged export
#      loads in transformers and gives what our loader reads from the same files;
#   2. a LoRA PEFT creates (random A and B) loads here and gives PEFT's logits;
# for LoRA, QLoRA (the base in NF4: bitsandbytes on the Python side, ours here), rsLoRA + DoRA,
# IA3, prompt tuning, prefix tuning and P-tuning (merged exports for the first four). One JSON line per comparison; exits non-zero if
# any differs by more than 2e-3 (f32 logits of scale ~30) or if the adapter barely moves the
# logits (the comparison would then prove nothing).
#
#   scripts/interop-check.sh [WORK_DIR]        # METHODS="lora ia3" runs some of them
#
# Needs the reference setup of ../shared/bench/README.md (REF, default ~/.cache/peft-reference:
# a venv with torch, transformers, peft and bitsandbytes, and smollm2-135m-hf, the GGUF dequantized into a
# Hugging Face directory). Not part of CI: PyTorch is far too large for its machines.
set -euo pipefail
cd "$(dirname "$0")/.."
REF="${REF:-$HOME/.cache/peft-reference}"
py="$REF/venv/bin/python"
model="$REF/smollm2-135m-hf"
work="${1:-$(mktemp -d)}"
if [ ! -x "$py" ] || [ ! -d "$model" ]; then
  echo "interop-check: no reference setup in $REF (see ../shared/bench/README.md)" >&2
  exit 2
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
cargo build -q --release -p peft_prelude --example interop_peft
bin="$CARGO_TARGET_DIR/release/examples/interop_peft"
check() { "$py" scripts/interop_peft.py "$@" 2> >(grep -v -e "Loading weights" -e "Warning" -e "warnings.warn" >&2); }
status=0
for method in ${METHODS:-lora qlora dora ia3 prompt prefix ptuning}; do
  "$bin" save "$model" "$work/ours-$method" "$method"
  check check-ours "$model" "$work/ours-$method" "$method" || status=1
  check make-theirs "$model" "$work/theirs-$method" "$method"
  "$bin" load "$model" "$work/theirs-$method/adapter" "$work/theirs-$method/ours.safetensors" "$method"
  check compare "$work/theirs-$method" || status=1
done
exit $status
