"""The browser check: the flagship notebook executed by JupyterLab in headless Chromium, its
widgets rendered by the stock widget manager (jupyterlab_widgets).

Run by scripts/browser-check.sh, which starts JupyterLab (app exposed to the page as
window.jupyterapp) on a copy of notebooks/mistral_lora.ipynb. Checks, failing loudly:
  - every cell runs without an error output;
  - the background run's panel is rendered: a log slider, pause/stop/sample buttons, a prompt
    box, its progress text at the last step (it kept updating after its cell had ended);
  - the page steers the run while it trains: "pause" holds the step count, a prompt typed into
    the panel and "sample" clicked streams an answer beneath it, "resume" goes on;
  - when the run has ended, its controls are greyed out;
  - nowhere on the page "Loading widget" or "Error displaying widget";
  - after saving and reloading the page, the widgets are rendered again from the kernel's state
    (comm_info and request_states answered by our kernel).
Writes docs/panel.png (the panel's cell).
"""

import re
import sys
import time

from playwright.sync_api import sync_playwright

url, chromium, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
BAD = ["Loading widget", "Error displaying widget"]


def log(msg):
    print(f"[browser-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_app(page):
    page.wait_for_function(
        "() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')",
        timeout=120_000,
    )
    # The kernel session is up when its status reads idle.
    page.wait_for_function(
        """() => {
          const w = window.jupyterapp.shell.currentWidget;
          const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
          return k && k.status === 'idle';
        }""",
        timeout=300_000,
    )


def cell_states(page):
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
             .map(p => p.textContent.trim())"""
    )


def error_outputs(page):
    return page.evaluate(
        """() => Array.from(document.querySelectorAll(
              '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]'))
             .map(e => e.textContent.slice(0, 400))"""
    )


def bad_text(page):
    text = page.evaluate("() => document.body.innerText")
    return [b for b in BAD if b in text]


def panel_facts(page):
    """What the panel cell's output shows (the cell whose source spawns the run)."""
    return page.evaluate(
        """() => {
          const cells = Array.from(document.querySelectorAll('.jp-CodeCell'));
          const cell = cells.find(c => c.querySelector('.jp-InputArea').textContent.includes('.spawn()'));
          if (!cell) return null;
          const out = cell.querySelector('.jp-OutputArea');
          const q = s => out.querySelectorAll(s).length;
          return {
            widgets: q('.jupyter-widgets'),
            sliders: q('.widget-slider, .jupyter-widget-slider'),
            buttons: Array.from(out.querySelectorAll('button')).map(b => b.textContent.trim()),
            texts: q('input[type=text]'),
            text: out.innerText,
          };
        }"""
    )


def check_panel(page, when):
    facts = panel_facts(page)
    log(f"panel ({when}): {facts}")
    assert facts is not None, "no cell spawns a run"
    assert facts["widgets"] > 0, f"{when}: the panel's output holds no rendered widget"
    assert facts["sliders"] >= 1, f"{when}: no learning-rate slider rendered"
    for name in ["pause", "stop", "sample"]:
        assert name in facts["buttons"], f"{when}: no {name!r} button rendered: {facts['buttons']}"
    assert facts["texts"] >= 1, f"{when}: no prompt box rendered"
    bad = bad_text(page)
    assert not bad, f"{when}: the page shows {bad}"
    return facts


def finished(facts):
    """Whether the panel's progress shows its last step ("… 24/24 …")."""
    m = re.search(r"(\d+)/(\d+) \[", facts["text"])
    return bool(m) and m.group(1) == m.group(2)


def panel_step(facts):
    """The step the panel's progress text shows ("… 5/16 …"), None before the first."""
    m = re.search(r"(\d+)/(\d+) \[", facts["text"])
    return (int(m.group(1)), int(m.group(2))) if m else None


def panel_cell(page):
    return page.locator(".jp-CodeCell", has_text=".spawn()").first


def steer(page, facts):
    """Pause, sample and resume the run from the panel's own widgets, as a user would."""
    step, total = panel_step(facts)
    assert step < total, f"the run ended before the page could steer it: {facts['text']!r}"
    cell = panel_cell(page)
    cell.get_by_role("button", name="pause").click()
    cell.get_by_role("button", name="resume").wait_for(timeout=20_000)
    time.sleep(4)  # the step under way when pause was clicked ends
    held = panel_step(panel_facts(page))
    time.sleep(4)
    still = panel_step(panel_facts(page))
    log(f"paused at {held}, {still} four seconds later")
    assert held == still and held[0] < total, f"pause did not hold the run: {held} then {still}"
    cell.locator("input[type=text]").fill("Say hello.")
    cell.get_by_role("button", name="sample").click()
    answer = cell.locator(".widget-html pre")
    answer.first.wait_for(timeout=120_000)
    deadline = time.time() + 120
    while not answer.first.inner_text().strip():
        assert time.time() < deadline, "the sampled answer stayed empty"
        time.sleep(0.5)
    log(f"sampled from the page while paused: {answer.first.inner_text().strip()[:80]!r}")
    cell.get_by_role("button", name="resume").click()
    deadline = time.time() + 60
    while (panel_step(panel_facts(page)) or (0, 0))[0] <= held[0]:
        assert time.time() < deadline, "resume did not restart the run"
        time.sleep(0.5)
    log(f"resumed: {panel_step(panel_facts(page))}")


def screenshot_panel(page, path):
    cell = panel_cell(page)
    cell.scroll_into_view_if_needed()
    cell.screenshot(path=path)
    log(f"wrote {path}")


with sync_playwright() as p:
    # Chromium now and then dies while starting in a container: three tries.
    for attempt in range(3):
        try:
            browser = p.chromium.launch(
                executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
            )
            break
        except Exception as e:
            log(f"chromium did not start ({type(e).__name__}); try {attempt + 2}")
            if attempt == 2:
                raise
            time.sleep(2)
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    page.goto(url)
    wait_app(page)
    log(f"kernel idle; {len(cell_states(page))} code cells; running all")
    # Not awaited: the command's promise settles only when the last cell has run.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    started = time.time()
    steered = False
    while True:
        time.sleep(0.5)
        errors = error_outputs(page)
        assert not errors, f"a cell failed: {errors}"
        # While the run trains in the background, its panel is rendered and answers the page.
        if not steered:
            facts = panel_facts(page)
            if facts and facts["widgets"] > 0 and panel_step(facts) is not None:
                steer(page, facts)
                steered = True
        states = cell_states(page)
        if all(s not in ("[*]:", "[ ]:") for s in states):
            break
        assert time.time() - started < 1500, f"cells still running after 25 minutes: {states}"
    log(f"all cells ran in {time.time() - started:.0f} s: {states}")
    assert steered, "the panel was never seen while the run trained"
    facts = check_panel(page, "after the run")
    assert finished(facts), f"the panel's progress did not reach the last step: {facts['text']!r}"
    for name in ["pause", "stop", "sample"]:
        assert panel_cell(page).get_by_role("button", name=name).is_disabled(), f"{name} still enabled after the run"
    screenshot_panel(page, f"{out_dir}/panel.png")

    # Save, reload: the widget manager asks the kernel for its comms and their state.
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    time.sleep(3)
    page.reload()
    wait_app(page)
    deadline = time.time() + 60
    while True:
        facts = panel_facts(page)
        if facts and facts["widgets"] > 0 and finished(facts):
            break
        assert time.time() < deadline, f"after a reload the panel is not rendered: {facts}"
        time.sleep(2)
    check_panel(page, "after a reload")
    browser.close()
log("ok")
