#!/usr/bin/env python3
"""A third reader of a GGUF file: transformers (weights dequantized by gguf-py, f32 forward)
greedily continues the four prompts of scripts/llamacpp-check.sh, to set beside llama.cpp's
continuations and ours (`ours_f32`, `ours_kept`) where those two disagree.

    ~/.cache/peft-reference/venv/bin/python scripts/gguf_transformers_check.py FILE.gguf [TOKENS]

Needs torch, transformers and gguf (the PyTorch reference environment of
scripts/bench-vs-pytorch.sh has them).
"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The history of computing began with",
    "Here is a simple recipe for pancakes:",
    "The three largest cities in France are",
    "def fibonacci(n):",
]


def main():
    path = os.path.abspath(sys.argv[1])
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        print(f"{prompt!r} -> {tok.decode(out[0, ids.shape[1]:])!r}")


if __name__ == "__main__":
    main()
