//! End-to-end tests of the Jupyter kernel through a real Jupyter client (jupyter_client and
//! nbclient from PyPI): `tests/jupyter/protocol.py` and `tests/jupyter/notebook.py`.
//!
//! Python is `$PEFT_TEST_PYTHON`, else `~/.cache/peft-venv/bin/python` (what `.ci/run`
//! creates), else `python3`; a Python without jupyter_client fails the test with the command
//! that installs it. The kernel's build cache should be warm (`peft-kernel warm`), otherwise
//! the first cell compiles the prelude (minutes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One kernel at a time: both tests then share the warm build slot.
static KERNEL: Mutex<()> = Mutex::new(());

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PEFT_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/peft-venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// target/<profile>/peft-kernel, built by `cargo test --workspace` (kernel/tests needs it).
fn kernel_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let binary = profile_dir.join("peft-kernel");
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build -p peft-kernel` (or `cargo test --workspace`)",
        binary.display()
    );
    binary
}

fn run_script(name: &str) {
    run_script_with(name, &[]);
}

fn run_script_with(name: &str, args: &[&str]) {
    let _one = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    let python = python();
    let check = Command::new(&python)
        .args(["-c", "import jupyter_client, nbclient, nbformat"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        check.success(),
        "{} lacks jupyter_client/nbclient/nbformat: run `python3 -m venv ~/.cache/peft-venv && \
         ~/.cache/peft-venv/bin/pip install jupyter_client nbclient nbformat` (or set PEFT_TEST_PYTHON)",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("jupyter")
        .join(name);
    let status = Command::new(&python)
        .arg(&script)
        .args(args)
        .env("PEFT_KERNEL_BIN", kernel_binary())
        .env("PYTHONUNBUFFERED", "1")
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(status.success(), "{} failed ({status})", script.display());
}

#[test]
fn kernel_protocol() {
    run_script("protocol.py");
}

#[test]
fn kernel_survives_a_dying_cell() {
    run_script("dying_cell.py");
}

#[test]
fn kernel_widgets() {
    run_script("widgets.py");
}

#[test]
fn kernel_background_training() {
    run_script("background.py");
}

#[test]
fn kernel_runs_the_notebook() {
    peft_tests::smollm2_gguf(); // fails with the fetch command when the model is missing
    run_script("notebook.py");
}

#[test]
fn kernel_runs_the_peft_methods_notebook() {
    peft_tests::smollm2_gguf();
    run_script_with("run_notebook.py", &["peft_methods.ipynb"]);
}

#[test]
fn kernel_runs_the_dpo_notebook() {
    peft_tests::smollm2_gguf();
    run_script_with("run_notebook.py", &["dpo.ipynb"]);
}
