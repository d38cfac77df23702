"""Widgets from Rust through a real Jupyter client: comm_open of the models (layout, style,
control) and a widget-view display; a value moved by the "page" (a comm_msg update from the
client) reaches a cell that is running; a button click reaches Rust (clicks() in a running
cell and an on_click callback); a value set from Rust reaches the page; echo_update,
request_state, comm_info and the widget manager's request_states are answered."""

import threading
import time

from kernel_env import check, execute, execute_in_background, second_client, start_kernel


def iopub_of(msgs, msg_type):
    return [m for _, m in msgs if m["msg_type"] == msg_type]


def send_comm(kc, comm_id, data):
    msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
    kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def wait_for(kc, predicate, timeout=20):
    """Reads iopub until a message satisfies `predicate`; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except Exception:
            continue
        if predicate(msg):
            return msg
    raise AssertionError("no such iopub message arrived")


def main():
    km, kc = start_kernel()
    try:
        reply, msgs, _ = execute(
            kc,
            'let slider = FloatSlider::new("lr", 0.1, (0.0, 1.0), 0.01);\n'
            'let button = Button::new("go");\n'
            "show(&HBox::new(&[&slider, &button]));\n"
            "slider.model_id().to_string() + \" \" + button.model_id()",
        )
        check(reply["content"]["status"] == "ok", reply["content"])
        opens = iopub_of(msgs, "comm_open")
        names = [o["content"]["data"]["state"].get("_model_name") for o in opens]
        check("FloatSliderModel" in names and "ButtonModel" in names and "HBoxModel" in names, names)
        check("LayoutModel" in names and "SliderStyleModel" in names, names)
        check(all(o["metadata"].get("version") == "2.1.0" for o in opens), [o["metadata"] for o in opens])
        check(all(o["content"]["target_name"] == "jupyter.widget" for o in opens), opens)
        mime = "application/vnd.jupyter.widget-view+json"
        shown = [m for m in iopub_of(msgs, "display_data") if mime in m["content"]["data"]]
        check(len(shown) == 1, iopub_of(msgs, "display_data"))
        view = shown[0]["content"]["data"][mime]
        check(view["version_major"] == 2, view)
        result = iopub_of(msgs, "execute_result")[0]["content"]["data"]["text/plain"]
        slider_id, button_id = result.strip('"').split(" ")
        box = next(o for o in opens if o["content"]["data"]["state"].get("_model_name") == "HBoxModel")
        check(box["content"]["comm_id"] == view["model_id"], (box, view))
        children = box["content"]["data"]["state"]["children"]
        check(children == [f"IPY_MODEL_{slider_id}", f"IPY_MODEL_{button_id}"], children)

        # A cell that runs until the page moves the slider and clicks the button.
        running = (
            'println!("running");\n'
            "let start = std::time::Instant::now();\n"
            "while slider.value() < 0.5 && start.elapsed().as_secs() < 60 { std::thread::sleep(std::time::Duration::from_millis(10)); }\n"
            'println!("saw {} after {:.2} s", slider.value(), start.elapsed().as_secs_f64());\n'
            "while button.clicks() == 0 && start.elapsed().as_secs() < 60 { std::thread::sleep(std::time::Duration::from_millis(10)); }\n"
            'println!("clicks {}", button.clicks());'
        )
        started = threading.Event()

        def on_msg(msg):
            if msg["msg_type"] == "stream" and "running" in msg["content"]["text"]:
                started.set()

        worker, result = execute_in_background(kc, running, on_msg=on_msg)
        check(started.wait(60), "the cell did not start")
        time.sleep(0.3)
        page = second_client(km.connection_file)
        sent = time.monotonic()
        update_id = send_comm(page, slider_id, {"method": "update", "state": {"value": 0.75}, "buffer_paths": []})
        echo = wait_for(
            page,
            lambda m: m["msg_type"] == "comm_msg"
            and m["parent_header"].get("msg_id") == update_id,
        )
        check(echo["content"]["data"]["method"] == "echo_update", echo["content"])
        check(echo["content"]["data"]["state"] == {"value": 0.75}, echo["content"])
        time.sleep(0.5)
        send_comm(page, button_id, {"method": "custom", "content": {"event": "click"}})
        worker.join(30)
        check("reply" in result, "the running cell did not finish")
        check(result["reply"]["content"]["status"] == "ok", result["reply"]["content"])
        printed = "".join(m["content"]["text"] for _, m in result["msgs"] if m["msg_type"] == "stream")
        check("saw 0.75" in printed, printed)
        waited = float(printed.split("after ")[1].split(" s")[0])
        check(waited >= 0.2, f"the value was there before the cell ran ({waited} s)")
        check("clicks 1" in printed, printed)
        print(f"running cell saw the page's slider and click; {printed.strip()!r}; {time.monotonic() - sent:.2f} s")

        # A value set from Rust goes to the page; the page asks for the state and gets it.
        reply, msgs, _ = execute(kc, "slider.set_value(0.3);")
        updates = [m for m in iopub_of(msgs, "comm_msg") if m["content"]["comm_id"] == slider_id]
        check(updates and updates[-1]["content"]["data"]["state"] == {"value": 0.3}, updates)
        req_id = send_comm(page, slider_id, {"method": "request_state"})
        full = wait_for(page, lambda m: m["msg_type"] == "comm_msg" and m["parent_header"].get("msg_id") == req_id)
        check(full["content"]["data"]["state"]["value"] == 0.3, full["content"])
        check(full["content"]["data"]["state"]["_model_name"] == "FloatSliderModel", full["content"])

        # The description's width goes to the slider's style model, which the page asks for.
        style_id = full["content"]["data"]["state"]["style"].removeprefix("IPY_MODEL_")
        reply, msgs, _ = execute(kc, 'slider.set_description_width("initial");')
        styled = [m for m in iopub_of(msgs, "comm_msg") if m["content"]["comm_id"] == style_id]
        check(styled and styled[-1]["content"]["data"]["state"] == {"description_width": "initial"}, styled)
        req_id = send_comm(page, style_id, {"method": "request_state"})
        full = wait_for(page, lambda m: m["msg_type"] == "comm_msg" and m["parent_header"].get("msg_id") == req_id)
        check(full["content"]["data"]["state"]["description_width"] == "initial", full["content"])

        # on_click runs Rust when the page clicks, also after the cell that set it up ended.
        reply, _, _ = execute(
            kc,
            "let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));\n"
            "let h = hits.clone();\n"
            "button.on_click(move || { h.fetch_add(1, std::sync::atomic::Ordering::SeqCst); });",
        )
        check(reply["content"]["status"] == "ok", reply["content"])
        for _ in range(2):
            send_comm(page, button_id, {"method": "custom", "content": {"event": "click"}})
        time.sleep(1.0)
        reply, msgs, _ = execute(kc, "hits.load(std::sync::atomic::Ordering::SeqCst)")
        value = iopub_of(msgs, "execute_result")[0]["content"]["data"]["text/plain"]
        check(value == "2", value)

        # comm_info lists the widgets; the widget manager restores every model.
        info = page.comm_info(target_name="jupyter.widget", reply=True, timeout=10)
        check(slider_id in info["content"]["comms"], info["content"])
        control = page.session.msg(
            "comm_open", {"comm_id": "ctrl-1", "target_name": "jupyter.widget.control", "data": {}}
        )
        page.shell_channel.send(control)
        time.sleep(0.3)
        req_id = send_comm(page, "ctrl-1", {"method": "request_states"})
        states = wait_for(page, lambda m: m["msg_type"] == "comm_msg" and m["parent_header"].get("msg_id") == req_id)
        check(slider_id in states["content"]["data"]["states"], list(states["content"]["data"]["states"]))
        page.stop_channels()
        print("widgets: all checks passed")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


if __name__ == "__main__":
    main()
