"""A training run in the background of the kernel: spawn() returns at once with its panel
(widgets); its progress keeps updating while two other cells execute; it pauses, resumes, takes
a new learning rate and answers a sample from a later cell; it stops and is saved. A second run
is refused while one trains. An interrupt stops a background run with a checkpoint, and so
does a kernel shutdown: nothing learned is lost."""

import json
import os
import shutil
import tempfile
import time

from kernel_env import ROOT, check, execute, start_kernel


def ok(reply):
    check(reply["content"]["status"] == "ok", reply["content"])


def result_of(msgs):
    for _, m in msgs:
        if m["msg_type"] == "execute_result":
            return m["content"]["data"]["text/plain"]
    return None


def run_cell(kc, code):
    reply, msgs, end = execute(kc, code)
    ok(reply)
    return msgs, result_of(msgs)


def setup(out, name, extra=""):
    fixture = os.path.join(ROOT, "tests", "fixtures", "tiny-mistral")
    return (
        f'let p = Pretrained::load("{fixture}", &LoadOptions::default())?;\n'
        'let tok = p.tokenizer.clone();\n'
        'let data = format_alpaca(&Dataset::from_json_file(example_data("mood_train.json")?)?, "</s>")?;\n'
        f'let args = TrainingArgs {{ output_dir: "{out}".into(), per_device_train_batch_size: 2, max_steps: 100000, '
        f'max_seq_length: 160, learning_rate: 1e-3, warmup_steps: 0, run_name: Some("{name}".into()), {extra} ..Default::default() }};\n'
        'let trainer = SftTrainer::new(get_peft_model(p.model, LoraConfig::all_projections(4, 8.0))?, tok.clone(), &data, args.clone())?;\n'
    )


def step_of(kc, run):
    _, value = run_cell(kc, f"{run}.status().step")
    return int(value)


def main():
    out = tempfile.mkdtemp(prefix="peft-background-")
    km, kc = start_kernel()
    try:
        # Spawn: the cell returns at once and shows the panel.
        t = time.monotonic()
        msgs, _ = run_cell(kc, setup(out, "bg") + "let run = trainer.spawn()?;")
        print(f"spawn cell returned after {time.monotonic() - t:.1f} s")
        opens = [m for _, m in msgs if m["msg_type"] == "comm_open"]
        models = [o["content"]["data"]["state"].get("_model_name") for o in opens]
        check("FloatLogSliderModel" in models and models.count("ButtonModel") == 3, models)
        shown = [m for _, m in msgs if m["msg_type"] == "display_data"
                 and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
        check(len(shown) == 1, "the panel is shown once")
        progress_id = next(o["content"]["comm_id"] for o in opens
                           if str(o["content"]["data"]["state"].get("value", "")).startswith("training bg"))

        # Two other cells run; the run's progress widget keeps updating meanwhile.
        first = step_of(kc, "run")
        updates = []
        for code in ["std::thread::sleep(std::time::Duration::from_millis(1500)); 40 + 2",
                     "std::thread::sleep(std::time::Duration::from_millis(1500)); \"other\""]:
            reply, msgs, _ = execute(kc, code)
            ok(reply)
            updates += [m for _, m in msgs if m["msg_type"] == "comm_msg"
                        and m["content"]["comm_id"] == progress_id]
        second = step_of(kc, "run")
        check(second > first, f"no progress while other cells ran ({first} -> {second})")
        check(len(updates) >= 2, f"only {len(updates)} progress updates during the other cells")
        print(f"background: steps {first} -> {second}; {len(updates)} progress updates during two other cells")

        # One run at a time.
        reply, msgs, _ = execute(kc, setup(out, "second").replace("let trainer", "let mut trainer2") + "trainer2.train()?;")
        check(reply["content"]["status"] == "error", reply["content"])
        check("is training in the background" in reply["content"]["evalue"], reply["content"]["evalue"])

        # Pause, resume, a new learning rate, a sample.
        run_cell(kc, "run.pause();")
        time.sleep(1.0)
        paused_at = step_of(kc, "run")
        time.sleep(1.0)
        _, state = run_cell(kc, "format!(\"{:?} {}\", run.status().state, run.status().step)")
        check(state.strip('"') == f"Paused {paused_at}", (state, paused_at))
        _, sampled = run_cell(kc, "run.sample(\"Hello\", 4)?.len() >= 0")
        check(sampled == "true", sampled)
        run_cell(kc, "run.set_learning_rate(1e-4); run.resume();")
        time.sleep(1.5)
        resumed = step_of(kc, "run")
        check(resumed > paused_at, (paused_at, resumed))
        _, lr = run_cell(kc, "run.status().learning_rate.unwrap()")
        check(abs(float(lr) - 1e-4) < 2e-5, lr)
        print(f"paused at step {paused_at}, resumed to {resumed}, learning rate now {lr}")

        # Stop, get the trainer back, save.
        adapter = os.path.join(out, "adapter")
        msgs, value = run_cell(kc, f'run.stop();\nlet trainer = run.wait()?;\ntrainer.model().save_pretrained("{adapter}")?;\ntrainer.state().global_step')
        check(int(value) >= resumed, value)
        # The ended run's controls are greyed out (the slider, three buttons, the prompt box).
        later, _ = run_cell(kc, "std::thread::sleep(std::time::Duration::from_millis(500));")
        greyed = {m["content"]["comm_id"] for _, m in msgs + later if m["msg_type"] == "comm_msg"
                  and m["content"]["data"].get("state", {}).get("disabled") is True}
        check(len(greyed) == 5, f"{len(greyed)} controls greyed out at the end of the run, not 5")
        check(os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")), "the adapter was not saved")
        history = json.load(open(os.path.join(out, "runs", "bg.json")))
        check(len(history["entries"]) == int(value), (len(history["entries"]), value))

        # An interrupt (sent while no cell runs) stops a background run, with a checkpoint.
        run_cell(kc, setup(out, "interrupted", "save_steps: Some(1000),") + "let run2 = trainer.spawn()?;")
        time.sleep(1.0)
        kc.control_channel.send(kc.session.msg("interrupt_request", {}))
        kc.control_channel.get_msg(timeout=10)
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            _, state = run_cell(kc, "format!(\"{:?}\", run2.status().state)")
            if "Interrupted" in state:
                break
            time.sleep(0.3)
        check("Interrupted" in state, state)
        _, step = run_cell(kc, "let t2 = run2.wait()?; t2.state().global_step")
        check(os.path.isdir(os.path.join(out, f"checkpoint-{step}")), os.listdir(out))
        print(f"interrupt: the background run stopped at step {step} with a checkpoint")

        # A shutdown with a run in the background: it stops and checkpoints first.
        run_cell(kc, setup(out, "shutdown", "save_steps: Some(1000),") + "let run3 = trainer.spawn()?;")
        time.sleep(1.5)
        before = set(os.listdir(out))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    after = set(os.listdir(out))
    new = sorted(after - before)
    check(any(n.startswith("checkpoint-") for n in new), f"no checkpoint written at shutdown: {new}")
    check(os.path.isfile(os.path.join(out, "runs", "shutdown.json")), "the run history was not saved")
    print(f"shutdown: the background run saved {new}")
    shutil.rmtree(out, ignore_errors=True)
    print("background: all checks passed")


if __name__ == "__main__":
    main()
