"""Executes one notebook (argument: its name under notebooks/) with nbclient on the rust-peft
kernel, from the notebooks folder, and checks that every code cell succeeded, that no cell
wrote an error to stderr, and that at least one plot arrived as SVG."""

import os
import sys
import time

import nbformat
from nbclient import NotebookClient

from kernel_env import KERNEL_NAME, ROOT, check, install_kernelspec


def save_if_asked(nb, path):
    """With PEFT_SAVE_EXECUTED=1 the executed notebook (outputs and plots) replaces the source,
    which is how the committed notebooks get their outputs."""
    if os.environ.get("PEFT_SAVE_EXECUTED") == "1":
        nbformat.write(nb, path)
        print(f"saved the executed notebook to {path}")


def main():
    name = sys.argv[1]
    install_kernelspec()
    path = os.path.join(ROOT, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=1800,
        startup_timeout=120,
        resources={"metadata": {"path": os.path.dirname(path)}},
    )
    started = time.monotonic()
    client.execute()  # raises CellExecutionError on an error reply
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    check(not errors, f"error outputs: {errors}")
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    # A `?` that returns early prints the error on stderr (evcxr reports the cell as done);
    # warnings (e.g. PEFT's merge warning) are fine.
    errors = [l for l in stderr.splitlines() if "error" in l.lower() and "Warning" not in l]
    check(not errors, f"a cell wrote an error: {errors[:20]}")
    check(any("image/svg+xml" in o.get("data", {}) for o in outputs), "no SVG plot among the outputs")
    print(f"{name}: {sum(c.cell_type == 'code' for c in nb.cells)} cells ok in {time.monotonic() - started:.0f} s")
    save_if_asked(nb, path)


if __name__ == "__main__":
    sys.exit(main())
