"""Shared setup of the Jupyter end-to-end tests: installs the rust-peft kernelspec into a
temporary Jupyter data directory and starts clients against it.

Run by tests/kernel_*.rs (`cargo test`), which pass the kernel binary in PEFT_KERNEL_BIN.
"""

import os
import subprocess
import sys
import tempfile
import time

try:
    import jupyter_client  # noqa: F401
except ImportError:
    sys.exit(
        "jupyter_client is not installed for " + sys.executable + ": run "
        "`python3 -m venv ~/.cache/peft-venv && ~/.cache/peft-venv/bin/pip install "
        "jupyter_client nbclient nbformat` (or set PEFT_TEST_PYTHON)"
    )

KERNEL_NAME = "rust-peft"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def install_kernelspec():
    """Installs the kernelspec into a fresh prefix and points Jupyter at it."""
    binary = os.environ.get("PEFT_KERNEL_BIN")
    if not binary:
        sys.exit("PEFT_KERNEL_BIN must name the peft-kernel binary")
    prefix = tempfile.mkdtemp(prefix="peft-jupyter-")
    subprocess.run([binary, "install", "--prefix", prefix, "--no-warm"], check=True)
    data_dir = os.path.join(prefix, "share", "jupyter")
    spec = os.path.join(data_dir, "kernels", KERNEL_NAME, "kernel.json")
    assert os.path.isfile(spec), f"{spec} was not written"
    os.environ["JUPYTER_PATH"] = data_dir
    return data_dir


def start_kernel():
    """Starts the kernel; returns (manager, blocking client) once it answers kernel_info."""
    from jupyter_client.manager import start_new_kernel

    install_kernelspec()
    km, kc = start_new_kernel(kernel_name=KERNEL_NAME, startup_timeout=120)
    return km, kc


def execute(kc, code, timeout=600, on_msg=None):
    """Runs `code`; returns (reply, iopub messages with arrival times [(t, msg)], reply time)."""
    msgs = []

    def hook(msg):
        msgs.append((time.monotonic(), msg))
        if on_msg:
            on_msg(msg)

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
    return reply, msgs, time.monotonic()


def execute_in_background(kc, code, on_msg=None):
    """Runs `code` on a thread of its own; returns (thread, result): once the thread has
    ended, result holds "reply", "msgs" and "end" as `execute` returns them."""
    import threading

    result = {}

    def run():
        result["reply"], result["msgs"], result["end"] = execute(kc, code, on_msg=on_msg)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, result


def second_client(connection_file):
    """Another client on the same kernel (the page, while the test's client waits on a cell)."""
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=connection_file)
    client.load_connection_file()
    client.start_channels()
    return client


def check(condition, message):
    if not condition:
        raise AssertionError(message)
