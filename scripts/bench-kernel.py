#!/usr/bin/env python3
"""Benchmark of the rust-peft kernel through a real Jupyter client (not a test; prints figures).

    ~/.cache/peft-venv/bin/python scripts/bench-kernel.py [--kernel NAME]

Reports: kernel start to first cell result (warm build cache: run `peft-kernel warm` first),
a trivial cell's round trip, and a cell that calls into the prelude. With --kernel NAME it
measures another installed kernelspec instead (e.g. stock `rust` from evcxr_jupyter; then the
first cell is `:dep peft_prelude = { path = ... }` followed by the `use` line).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "jupyter"))
os.environ.setdefault(
    "PEFT_KERNEL_BIN",
    os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/peft-target")), "debug", "peft-kernel"),
)
from kernel_env import KERNEL_NAME, ROOT, execute, install_kernelspec  # noqa: E402
from jupyter_client.manager import start_new_kernel  # noqa: E402


def timed(kc, code, timeout=600):
    t = time.monotonic()
    reply, _, _ = execute(kc, code, timeout=timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return time.monotonic() - t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", default=None, help="an installed kernelspec to measure instead")
    args = parser.parse_args()
    name = args.kernel or KERNEL_NAME
    if args.kernel is None:
        install_kernelspec()
    t0 = time.monotonic()
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=120)
    ready = time.monotonic() - t0
    try:
        if args.kernel is not None:
            prelude = os.path.join(ROOT, "peft_prelude")
            # A stock kernel compiles candle and the prelude here (minutes on a fresh build dir).
            dep = timed(kc, f':dep peft_prelude = {{ path = "{prelude}" }}\nuse peft_prelude::prelude::*;', 3600)
            print(f"  :dep peft_prelude cell              {dep:6.2f} s")
        timed(kc, "1 + 1")
        first = time.monotonic() - t0
        trivial = [timed(kc, "1 + 1") for _ in range(5)]
        prelude_cell = "Tensor::arange(0f32, 6f32, &Device::Cpu)?.reshape((2, 3))?.sum_all()?.to_scalar::<f32>()?"
        calls = [timed(kc, prelude_cell) for _ in range(3)]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(f"kernel: {name}")
    print(f"  start -> kernel_info reply        {ready:6.2f} s")
    print(f"  start -> first cell result        {first:6.2f} s")
    print(f"  trivial cell (median of 5)        {statistics.median(trivial):6.2f} s")
    print(f"  prelude cell (median of 3)        {statistics.median(calls):6.2f} s  (first {calls[0]:.2f} s)")


if __name__ == "__main__":
    main()
