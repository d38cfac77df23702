"""Executes notebooks/mistral_lora.ipynb with nbclient on the rust-peft kernel, then checks the
live behaviour: the plot arrives as SVG, display updates arrive while the plot cell runs,
streamed tokens arrive before the generation cell ends, and an interrupt of a long generation
returns within 2 s with every earlier variable intact."""

import os
import sys
import threading
import time

import nbformat
from nbclient import NotebookClient

from kernel_env import KERNEL_NAME, ROOT, check, execute, execute_in_background, install_kernelspec, second_client


class RecordingClient(NotebookClient):
    """Records every iopub message with its arrival time, per cell."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages = {}

    def process_message(self, msg, cell, cell_index):
        self.messages.setdefault(cell_index, []).append((time.monotonic(), msg))
        return super().process_message(msg, cell, cell_index)


def source(cell):
    return cell.source if isinstance(cell.source, str) else "".join(cell.source)


def save_if_asked(nb, path):
    """With PEFT_SAVE_EXECUTED=1 the executed notebook (outputs and plots) replaces the source,
    which is how the committed notebooks get their outputs."""
    if os.environ.get("PEFT_SAVE_EXECUTED") == "1":
        nbformat.write(nb, path)
        print(f"saved the executed notebook to {path}")


def main():
    install_kernelspec()
    path = os.path.join(ROOT, "notebooks", "mistral_lora.ipynb")
    nb = nbformat.read(path, as_version=4)
    client = RecordingClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=1800,
        startup_timeout=120,
        resources={"metadata": {"path": os.path.dirname(path)}},
    )
    ends = {}
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            t = time.monotonic()
            client.execute_cell(cell, index)  # raises CellExecutionError on an error
            ends[index] = time.monotonic()
            print(f"cell {index}: ok in {ends[index] - t:.1f} s", flush=True)

        # As NotebookClient.execute() does at its end: the live widgets' state into the
        # notebook's metadata, so the saved notebook shows them.
        client.set_widgets_metadata()
        save_if_asked(nb, path)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        check(any("image/svg+xml" in o.get("data", {}) for o in outputs), "no SVG plot among the outputs")
        check(any("text/html" in o.get("data", {}) and "<table>" in o["data"]["text/html"] for o in outputs),
              "no config table")

        # The training cell: its progress bar and loss curve redraw while it runs.
        plot_cell = next(i for i, c in enumerate(nb.cells) if "trainer.train()" in source(c))
        updates = [t for t, m in client.messages[plot_cell] if m["msg_type"] == "update_display_data"]
        check(len(updates) >= 2, f"only {len(updates)} update_display_data in the training cell")
        check(min(updates) < ends[plot_cell] - 0.5, "display updates arrived only at the end of the cell")
        rate = len(updates) / max(ends[plot_cell] - min(updates), 1e-3)
        check(rate <= 10, f"{rate:.1f} display updates per second: not coalesced")
        print(f"training cell: {len(updates)} updates ({rate:.1f}/s)")
        # The held-out prompts are answered correctly after training.
        answers = "".join(
            o.get("text", "") for c in nb.cells if "held-out reviews labelled correctly" in source(c) for o in c.outputs
        )
        print("after training:", answers.strip().splitlines()[-1] if answers.strip() else "(nothing)")
        check("6 of 6 held-out" in answers or "5 of 6 held-out" in answers, answers)

        # The merged 16-bit model, reloaded, answers every held-out prompt as the adapter model.
        merged_out = "".join(
            o.get("text", "") for c in nb.cells if c.cell_type == "code" and "save_pretrained_merged" in source(c) for o in c.outputs
        )
        print("merged:", merged_out.strip())
        check("adapter model's answer on 6 of 6 prompts" in merged_out, merged_out)

        # The background run: its panel (widgets) shows in the spawn cell, the next cell
        # samples while it trains, the saved notebook keeps the widgets' state.
        spawn_cell = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and ".spawn()" in source(c))
        widget_views = [m for _, m in client.messages[spawn_cell] if m["msg_type"] == "display_data"
                        and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
        check(len(widget_views) == 1, "the spawn cell shows no panel")
        sampled = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" and "run.sample(" in source(c) for o in c.outputs)
        print("while training:", sampled.strip())
        step, total = sampled.split("after ")[1].split(" steps")[0].split(" of ")
        check(int(step) < int(total), f"the sample came after the run ended ({sampled})")
        states = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
        check(any(s["model_name"] == "FloatLogSliderModel" for s in states.values()), "no widget state saved")

        gen_cell = next(i for i, c in enumerate(nb.cells) if "TokenStreamer::new" in source(c))
        streams = [t for t, m in client.messages[gen_cell] if m["msg_type"] == "stream"]
        check(len(streams) >= 3, f"only {len(streams)} stream messages in the generation cell")
        check(min(streams) < ends[gen_cell] - 0.3, "streamed tokens arrived only at the end of the cell")
        text = "".join(m["content"]["text"] for _, m in client.messages[gen_cell] if m["msg_type"] == "stream")
        print("generated:", text.strip().replace("\n", " | "))

        # Interrupt a long generation: it stops within 2 s and every variable survives.
        # nbclient's own client is asynchronous: drive the rest with a blocking one.
        kc = second_client(client.km.connection_file)
        first_token = threading.Event()

        def on_msg(msg):
            if msg["msg_type"] == "stream":
                first_token.set()

        long_cell = (
            "let long = GenerationConfig { max_new_tokens: 4000, eos_token_ids: vec![], "
            "..config.clone() };\n"
            "let stopped = generate(&merged, &tokenizer, &prompt, &long, "
            "Some(&mut TokenStreamer::new()))?;\n"
            "println!(\"stopped after {} tokens: {:?}\", stopped.new_tokens, stopped.finish_reasons);"
        )
        worker, result = execute_in_background(kc, long_cell, on_msg=on_msg)
        check(first_token.wait(120), "the long generation produced no token")
        time.sleep(1.0)
        t = time.monotonic()
        # What KernelManager.interrupt_kernel sends for interrupt_mode "message".
        kc.control_channel.send(kc.session.msg("interrupt_request", {}))
        worker.join(30)
        check("reply" in result, "the interrupted cell did not finish")
        took = result["end"] - t
        print(f"interrupt: the cell returned {took:.2f} s after interrupt_request")
        check(took < 2.0, f"the interrupted cell took {took:.2f} s to return")
        check(result["reply"]["content"]["status"] == "ok", result["reply"]["content"])
        printed = "".join(m["content"]["text"] for _, m in result["msgs"] if m["msg_type"] == "stream")
        check("Stopped" in printed, printed)

        reply, msgs, _ = execute(kc, "(output.new_tokens > 0, stopped.new_tokens > 0, merged.config().hidden_size)")
        check(reply["content"]["status"] == "ok", reply["content"])
        value = next(m["content"]["data"]["text/plain"] for _, m in msgs if m["msg_type"] == "execute_result")
        check(value.startswith("(true, true, "), value)
        print("after the interrupt:", value)
        kc.stop_channels()
    print("notebook: all checks passed")


if __name__ == "__main__":
    sys.exit(main())
