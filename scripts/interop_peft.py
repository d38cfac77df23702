"""The Python half of scripts/interop-check.sh: Hugging Face PEFT and transformers on one side
of each comparison, our example `interop_peft` on the other.

  interop_peft.py check-ours MODEL_DIR WORK
      Loads WORK/adapter (saved by us) into transformers + PEFT and compares its logits with
      WORK/ours.safetensors; loads WORK/merged (our 16-bit export) with transformers and
      compares with WORK/ours_merged.safetensors (our loader on the same files).
  interop_peft.py make-theirs MODEL_DIR WORK METHOD
      A PEFT adapter saved to WORK/adapter, its logits (and the base model's) to
      WORK/theirs.safetensors. METHOD: lora (r=8, alpha 16, all seven projections, random A and
      B so it is not the identity; no task type, so PEFT writes "task_type": null), dora (the
      same with rsLoRA and DoRA), ia3 (k, v, down; its vectors moved off one), prompt, prefix,
      ptuning (8 virtual tokens, PEFT's random initialisation, CAUSAL_LM).
  interop_peft.py compare WORK
      WORK/theirs.safetensors against WORK/ours.safetensors.

Each comparison prints one JSON line and exits non-zero when the logits differ by more than
TOLERANCE (max |difference|, f32 on both sides).
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

PROBE_LEN = 24
TOLERANCE = 2e-3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def probe_ids(vocab):
    # The same ids as the Rust half (peft_prelude/examples/interop_peft.rs).
    return torch.tensor([[(i * 2654435761 + 7) % vocab for i in range(PROBE_LEN)]])


def base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model):
    return model(probe_ids(model.config.vocab_size)).logits.float()


def report(what, ours, theirs, base_logits):
    diff = (ours - theirs).abs().max().item()
    # How far the adapter moves the base model's logits: the difference above must be far
    # smaller for the check to mean anything.
    # (prompt tuning and P-tuning return the virtual tokens' positions first, as PEFT does).
    effect = (theirs[:, -PROBE_LEN:] - base_logits).abs().max().item()
    ok = diff <= TOLERANCE and effect > 100 * diff
    print(json.dumps({
        "check": what,
        "max_abs_diff": diff,
        "adapter_effect": effect,
        "logit_scale": theirs.abs().max().item(),
        "argmax_agree": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "ok": ok,
    }))
    return ok


def check_ours(model_dir, work):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = base(model_dir)
    base_logits = logits(plain)
    model = PeftModel.from_pretrained(plain, f"{work}/adapter").eval()
    ok = report(f"{work}: our adapter in PEFT", load_file(f"{work}/ours.safetensors")["logits"],
                logits(model), base_logits)
    if not os.path.isdir(f"{work}/merged"):
        return ok  # prompt-learning methods: nothing to merge
    merged = AutoModelForCausalLM.from_pretrained(f"{work}/merged", dtype=torch.float32).eval()
    ok &= report(f"{work}: our 16-bit merged export in transformers",
                 load_file(f"{work}/ours_merged.safetensors")["logits"], logits(merged),
                 base_logits)
    return ok


def peft_config(method):
    import peft

    causal = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 8}
    if method in ("lora", "dora"):
        dora = method == "dora"
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=dora,
                               use_rslora=dora, init_lora_weights=False)
    if method == "ia3":
        return peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"])
    if method == "prompt":
        return peft.PromptTuningConfig(**causal)
    if method == "prefix":
        return peft.PrefixTuningConfig(**causal)
    if method == "ptuning":
        return peft.PromptEncoderConfig(encoder_hidden_size=64, **causal)
    sys.exit(f"unknown method {method}")


def make_theirs(model_dir, work, method):
    from peft import get_peft_model

    torch.manual_seed(0)
    plain = base(model_dir)
    base_logits = logits(plain)
    model = get_peft_model(plain, peft_config(method)).eval()
    if method == "ia3":
        with torch.no_grad():  # IA3 starts at one (the identity): move it
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(f"{work}/adapter")
    save_file({"logits": logits(model).contiguous(), "base_logits": base_logits.contiguous()},
              f"{work}/theirs.safetensors")
    return True


def compare(work):
    theirs = load_file(f"{work}/theirs.safetensors")
    return report(f"{work}: PEFT's adapter here", load_file(f"{work}/ours.safetensors")["logits"],
                  theirs["logits"], theirs["base_logits"])


def main(argv):
    command = argv[1] if len(argv) > 1 else ""
    if command == "check-ours" and len(argv) == 4:
        return check_ours(argv[2], argv[3])
    if command == "make-theirs" and len(argv) == 5:
        return make_theirs(argv[2], argv[3], argv[4])
    if command == "compare" and len(argv) == 3:
        return compare(argv[2])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv) else 1)
