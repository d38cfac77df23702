"""The Python half of scripts/interop-check.sh: Hugging Face PEFT and transformers on one side
of each comparison, our example `interop_peft` on the other.

  interop_peft.py check-ours MODEL_DIR WORK [METHOD]
      Loads WORK/adapter (saved by us) into transformers + PEFT and compares its logits with
      WORK/ours.safetensors; loads WORK/merged (our 16-bit export) with transformers and
      compares with WORK/ours_merged.safetensors (our loader on the same files).
  interop_peft.py make-theirs MODEL_DIR WORK METHOD
      A PEFT adapter saved to WORK/adapter, its logits (and the base model's) to
      WORK/theirs.safetensors. METHOD: lora (r=8, alpha 16, all seven projections, random A and
      B so it is not the identity; no task type, so PEFT writes "task_type": null), qlora (the
      same on the base loaded in 4 bits by bitsandbytes: NF4, double quantization), dora (the
      same with rsLoRA and DoRA), ia3 (k, v, down; its vectors moved off one), prompt, prefix,
      ptuning (8 virtual tokens, PEFT's random initialisation, CAUSAL_LM).
  interop_peft.py compare WORK

With qlora the base is quantized by bitsandbytes here and by our own NF4 (bit-exact with it)
on the other side; both compute in f32 (see `dequantized`).
      WORK/theirs.safetensors against WORK/ours.safetensors.

Each comparison prints one JSON line. The reference is the Python stack run in float64 on the
same model and adapter; a comparison passes when our f32 logits are within TOLERANCE of it, or
no further from it than twice the Python stack's own f32 result is (max |difference|), and the
adapter moves the logits by over 100 times that difference.
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


def base(model_dir, method="lora"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method != "qlora":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config,
                                                 dtype=torch.float32, device_map="cpu")
    return dequantized(model).eval()


def dequantized(model):
    """Every bitsandbytes 4-bit layer replaced by an f32 Linear holding its dequantized weight.

    bitsandbytes' CPU Linear4bit computes in reduced precision (on SmolLM2's first q_proj its
    output is up to 0.19 from x·Wᵀ with its own dequantized W), which would hide any adapter
    difference; its dequantized weights are what it multiplies by, and ours equal them bit for
    bit, so the comparison runs both sides on those weights in f32.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            dense.weight.data = F.dequantize_4bit(module.weight.data,
                                                  module.weight.quant_state).float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model


@torch.no_grad()
def logits(model):
    return model(probe_ids(model.config.vocab_size)).logits.float()


def logits_f32_f64(model):
    """The model's logits in float32, then in float64 (the model is converted in place)."""
    l32 = logits(model)
    model.double()
    with torch.no_grad():
        l64 = model(probe_ids(model.config.vocab_size)).logits
    return l32, l64


def report(what, ours, theirs32, theirs64, base_logits):
    ours = ours.double()
    diff = (ours - theirs64).abs().max().item()
    their_own = (theirs32.double() - theirs64).abs().max().item()
    # How far the adapter moves the base model's logits (prompt tuning and P-tuning return
    # the virtual tokens' positions first, as PEFT does).
    effect = (theirs32[:, -PROBE_LEN:] - base_logits).abs().max().item()
    ok = diff <= max(TOLERANCE, 2 * their_own) and effect > 100 * diff
    print(json.dumps({
        "check": what,
        "ours_vs_float64": diff,
        "python_f32_vs_float64": their_own,
        "ours_vs_python_f32": (ours - theirs32.double()).abs().max().item(),
        "adapter_effect": effect,
        "logit_scale": theirs32.abs().max().item(),
        "argmax_agree": (ours.argmax(-1) == theirs64.argmax(-1)).double().mean().item(),
        "ok": ok,
    }))
    return ok


def check_ours(model_dir, work, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = base(model_dir, method)
    base_logits = logits(plain)
    model = PeftModel.from_pretrained(plain, f"{work}/adapter").eval()
    ok = report(f"{work}: our adapter in PEFT", load_file(f"{work}/ours.safetensors")["logits"],
                *logits_f32_f64(model), base_logits)
    if not os.path.isdir(f"{work}/merged"):
        return ok  # prompt-learning methods: nothing to merge
    merged = AutoModelForCausalLM.from_pretrained(f"{work}/merged", dtype=torch.float32).eval()
    ok &= report(f"{work}: our 16-bit merged export in transformers",
                 load_file(f"{work}/ours_merged.safetensors")["logits"],
                 *logits_f32_f64(merged), base_logits)
    return ok


def peft_config(method):
    import peft

    causal = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 8}
    if method in ("lora", "qlora", "dora"):
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
    plain = base(model_dir, method)
    base_logits = logits(plain)
    model = get_peft_model(plain, peft_config(method)).eval()
    if method == "ia3":
        with torch.no_grad():  # IA3 starts at one (the identity): move it
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(f"{work}/adapter")
    l32, l64 = logits_f32_f64(model)
    save_file({"logits": l32.contiguous(), "logits_f64": l64.contiguous(),
               "base_logits": base_logits.contiguous()}, f"{work}/theirs.safetensors")
    return True


def compare(work):
    theirs = load_file(f"{work}/theirs.safetensors")
    return report(f"{work}: PEFT's adapter here", load_file(f"{work}/ours.safetensors")["logits"],
                  theirs["logits"], theirs["logits_f64"], theirs["base_logits"])


def main(argv):
    command = argv[1] if len(argv) > 1 else ""
    if command == "check-ours" and len(argv) in (4, 5):
        return check_ours(argv[2], argv[3], argv[4] if len(argv) == 5 else "lora")
    if command == "make-theirs" and len(argv) == 5:
        return make_theirs(argv[2], argv[3], argv[4])
    if command == "compare" and len(argv) == 3:
        return compare(argv[2])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv) else 1)
