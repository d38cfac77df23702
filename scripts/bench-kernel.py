#!/usr/bin/env python3
"""Benchmark of the rust-peft kernel through a real Jupyter client (not a test; prints figures).

    ~/.cache/peft-venv/bin/python scripts/bench-kernel.py [--kernel NAME]

Reports: kernel start to first cell result (warm build cache: run `peft-kernel warm` first),
restart to first result, and medians (with min and max) of a trivial cell's round trip, a cell
that calls into the prelude and a cell that defines a variable (after the kernel sat idle 8 s,
as a user reading the notebook leaves it). With --kernel NAME it
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


def median_of(kc, code, n):
    times = [timed(kc, code) for _ in range(n)]
    return statistics.median(times), min(times), max(times)


def first_result_after_restart(km, kc):
    """Restart (as JupyterLab's button does: shutdown, new process) -> first cell result."""
    t = time.monotonic()
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=120)
    timed(kc, "1 + 1")
    return time.monotonic() - t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", default=None, help="an installed kernelspec to measure instead")
    parser.add_argument("-n", type=int, default=20, help="cells per median")
    args = parser.parse_args()
    name = args.kernel or KERNEL_NAME
    if args.kernel is None:
        install_kernelspec()
    prelude = os.path.join(ROOT, "peft_prelude")
    load = f':dep peft_prelude = {{ path = "{prelude}" }}\nuse peft_prelude::prelude::*;'
    t0 = time.monotonic()
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=120)
    ready = time.monotonic() - t0
    try:
        if args.kernel is not None:
            # A stock kernel compiles candle and the prelude here (minutes on a fresh build dir).
            dep = timed(kc, load, 3600)
            print(f"  :dep peft_prelude cell              {dep:6.2f} s")
        timed(kc, "1 + 1")
        first = time.monotonic() - t0
        trivial = median_of(kc, "1 + 1", args.n)
        prelude_cell = "Tensor::arange(0f32, 6f32, &Device::Cpu)?.reshape((2, 3))?.sum_all()?.to_scalar::<f32>()?"
        calls = median_of(kc, prelude_cell, args.n)
        time.sleep(8)
        lets = [timed(kc, f"let v{i} = {i} + 1;") for i in range(args.n)]
        first_let, lets = lets[0], (statistics.median(lets), min(lets), max(lets))
        if args.kernel is None:
            restart = first_result_after_restart(km, kc)
        else:
            t = time.monotonic()
            km.restart_kernel(now=False)
            kc.wait_for_ready(timeout=120)
            timed(kc, load, 3600)
            restart = time.monotonic() - t
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(f"kernel: {name}")
    print(f"  start -> kernel_info reply        {ready:6.2f} s")
    print(f"  start -> first cell result        {first:6.2f} s")
    print(f"  restart -> first result           {restart:6.2f} s" + ("" if args.kernel is None else "  (the :dep cell)"))
    print(f"  trivial cell (median of {args.n})      {trivial[0]:6.3f} s  (min {trivial[1]:.3f}, max {trivial[2]:.3f})")
    print(f"  prelude cell (median of {args.n})      {calls[0]:6.3f} s  (min {calls[1]:.3f}, max {calls[2]:.3f})")
    print(f"  `let` cell (median of {args.n})        {lets[0]:6.3f} s  (min {lets[1]:.3f}, max {lets[2]:.3f}; the first {first_let:.2f} s)")


if __name__ == "__main__":
    main()
