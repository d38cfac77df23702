"""The kernel's Jupyter protocol, through a real jupyter_client: execution with results,
kernel_info on control, completion while a cell runs, is_complete, comm_info, history, and
errors (compile error, panic) after which earlier variables still work."""

import time

from kernel_env import check, execute, execute_in_background, second_client, start_kernel


def text_result(msgs):
    for _, m in msgs:
        if m["msg_type"] == "execute_result":
            return m["content"]["data"].get("text/plain")
    return None


def shell_reply(kc, msg_id, timeout=10):
    """The shell reply to `msg_id` (for requests whose client method has no `reply=`)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.01))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def main():
    t0 = time.monotonic()
    km, kc = start_kernel()
    print(f"kernel_info after {time.monotonic() - t0:.1f} s")
    try:
        # kernel_info on the control channel.
        msg = kc.session.msg("kernel_info_request")
        kc.control_channel.send(msg)
        reply = kc.control_channel.get_msg(timeout=10)
        check(reply["msg_type"] == "kernel_info_reply", reply)
        check(reply["content"]["language_info"]["name"] == "rust", reply["content"])
        check(reply["content"]["language_info"]["pygments_lexer"] == "rust", reply["content"])

        # A first cell (waits for the prelude) and a result.
        t = time.monotonic()
        reply, msgs, _ = execute(kc, "let x: u64 = 40 + 2;\nx")
        print(f"first cell after {time.monotonic() - t:.1f} s")
        check(reply["content"]["status"] == "ok", reply["content"])
        check(text_result(msgs) == "42", msgs)
        check(reply["content"]["execution_count"] == 1, reply["content"])

        # The prelude is in scope without any `use`.
        reply, msgs, _ = execute(kc, "Table::new([\"a\"]).row([\"1\"]).rows.len()")
        check(reply["content"]["status"] == "ok", reply["content"])
        check(text_result(msgs) == "1", msgs)

        # Started from `cargo test`, the kernel drops cargo's package variables, which evcxr's
        # cargo (and the cell process) would otherwise inherit: build scripts that watch them
        # would redo the warm build of the prelude's dependencies.
        reply, msgs, _ = execute(kc, 'std::env::var_os("CARGO_PKG_NAME").is_none() && std::env::var_os("CARGO_MANIFEST_DIR").is_none()')
        check(text_result(msgs) == "true", msgs)

        # A cell's last expression shows as evcxr shows it: Debug for plain values (the
        # prelude's DebugDisplay gives every Debug type `evcxr_display`, saving evcxr's second
        # build), a type's own `evcxr_display` still wins (a table's HTML, a user's struct).
        reply, msgs, _ = execute(kc, 'vec![Some("a"), None]')
        check(text_result(msgs) == '[Some("a"), None]', msgs)
        # The method is the prelude's (stock evcxr has none for a u8: error E0599).
        reply, msgs, _ = execute(kc, "7u8.evcxr_display();")
        check(reply["content"]["status"] == "ok", reply["content"])
        check(text_result(msgs) == "7", msgs)
        reply, msgs, _ = execute(kc, 'Table::new(["col"]).row(["1"])')
        results = [m["content"]["data"] for _, m in msgs if m["msg_type"] == "execute_result"]
        check(results and "text/html" in results[0] and "<table" in results[0]["text/html"], msgs)
        reply, msgs, _ = execute(
            kc,
            "#[derive(Debug)] struct Mine(u8);\n"
            "impl Mine { fn evcxr_display(&self) { println!(\"EVCXR_BEGIN_CONTENT text/plain\\nmine {}\\nEVCXR_END_CONTENT\", self.0); } }\n"
            "Mine(7)",
        )
        check(text_result(msgs) == "mine 7", msgs)

        # Completion and inspection are answered while a cell runs.
        kc2 = second_client(km.connection_file)
        slow_cell, slow = execute_in_background(kc, "std::thread::sleep(std::time::Duration::from_secs(4));")
        time.sleep(1.0)
        t = time.monotonic()
        reply = kc2.complete("x.pow", 5, reply=True, timeout=10)
        check(reply["content"]["status"] == "ok", reply["content"])
        check(slow_cell.is_alive(), "the completion waited for the running cell")
        print(f"complete_reply during a running cell in {time.monotonic() - t:.2f} s")
        reply = kc2.inspect("x", 1, reply=True, timeout=10)
        check(reply["content"]["status"] == "ok", reply["content"])
        # is_complete, comm_info, history.
        reply = shell_reply(kc2, kc2.is_complete("fn f() {"))
        check(reply["content"]["status"] == "incomplete", reply["content"])
        reply = shell_reply(kc2, kc2.is_complete("let a = 1;"))
        check(reply["content"]["status"] == "complete", reply["content"])
        reply = kc2.comm_info(reply=True, timeout=10)
        check(reply["content"] == {"status": "ok", "comms": {}}, reply["content"])
        reply = kc2.history(hist_access_type="tail", n=10, reply=True, timeout=10)
        inputs = [entry[2] for entry in reply["content"]["history"]]
        check(any("40 + 2" in i for i in inputs), inputs)
        slow_cell.join(30)
        check("reply" in slow, "the slow cell did not finish")
        check(slow["reply"]["content"]["status"] == "ok", slow["reply"]["content"])
        kc2.stop_channels()

        # Completion with the kernel idle comes from rust-analyzer.
        reply = kc.complete("x.pow", 5, reply=True, timeout=60)
        print("completions of x.pow:", reply["content"]["matches"][:5])

        # A compile error: an error reply with rustc's message; earlier variables remain.
        reply, msgs, _ = execute(kc, 'let y: u32 = "not a number";')
        check(reply["content"]["status"] == "error", reply["content"])
        check("mismatched types" in reply["content"]["evalue"], reply["content"])
        check(any(m["msg_type"] == "error" for _, m in msgs), "no error message on iopub")
        reply, msgs, _ = execute(kc, "x + 1")
        check(text_result(msgs) == "43", msgs)

        # A panic: an error reply with the panic message; earlier variables remain.
        reply, msgs, _ = execute(kc, 'let z = 5;\npanic!("boom {}", x);')
        check(reply["content"]["status"] == "error", reply["content"])
        check("boom 42" in reply["content"]["evalue"], reply["content"])
        reply, msgs, _ = execute(kc, "x * 2")
        check(reply["content"]["status"] == "ok", reply["content"])
        check(text_result(msgs) == "84", msgs)

        # An error returned through `?`: an error reply with its message (evcxr itself calls
        # the cell a success); the kernel's internal marker line is not shown.
        reply, msgs, _ = execute(kc, 'let n: i32 = "12x".parse()?;\nn')
        check(reply["content"]["status"] == "error", reply["content"])
        check("invalid digit" in reply["content"]["evalue"], reply["content"])
        streams = "".join(m["content"]["text"] for _, m in msgs if m["msg_type"] == "stream")
        check("PEFT_KERNEL" not in streams, streams)
        reply, msgs, _ = execute(kc, "x * 3")
        check(reply["content"]["status"] == "ok", reply["content"])
        check(text_result(msgs) == "126", msgs)

        # Raw stream output without a newline, and a display update.
        reply, msgs, _ = execute(
            kc, 'print_stream("no newline");\nlet d = show("first");\nd.update("second");'
        )
        check(reply["content"]["status"] == "ok", reply["content"])
        streams = "".join(m["content"]["text"] for _, m in msgs if m["msg_type"] == "stream")
        check("no newline" in streams, msgs)
        check(any(m["msg_type"] == "update_display_data" for _, m in msgs), msgs)

        # A user's own plotters chart, shown with one call and redrawn in place.
        chart = (
            "use plotters::prelude::*;\n"
            "let mut fig = Figure::new(320, 200);\n"
            "for n in 1..=3u32 {\n"
            "    fig.draw(|root| {\n"
            "        let mut chart = ChartBuilder::on(root).caption(format!(\"{n} points\"), (\"sans-serif\", 16))\n"
            "            .x_label_area_size(20).y_label_area_size(30).build_cartesian_2d(0f64..3.0, 0f64..9.0)?;\n"
            "        chart.configure_mesh().draw()?;\n"
            "        chart.draw_series(LineSeries::new((0..=n).map(|x| (x as f64, (x * x) as f64)), &RED))?;\n"
            "        Ok(())\n"
            "    })?;\n"
            "    std::thread::sleep(std::time::Duration::from_millis(300));\n"
            "}"
        )
        reply, msgs, _ = execute(kc, chart)
        check(reply["content"]["status"] == "ok", reply["content"])
        shown = [m for _, m in msgs if m["msg_type"] == "display_data"]
        updates = [m for _, m in msgs if m["msg_type"] == "update_display_data"]
        check(len(shown) == 1 and "image/svg+xml" in shown[0]["content"]["data"], shown)
        display_id = shown[0]["content"]["transient"]["display_id"]
        check(updates and all(u["content"]["transient"]["display_id"] == display_id for u in updates), updates)
        check("3 points" in updates[-1]["content"]["data"]["image/svg+xml"], "the last drawing is shown")
        print(f"plotters figure: shown once, updated {len(updates)} times in place")
        print("protocol: all checks passed")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


if __name__ == "__main__":
    main()
