//! The evcxr context with the prelude loaded: creation (in a locked build slot), cell
//! execution, and the bits of environment the cell process needs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use evcxr::{CommandContext, EvalContext, EvalContextOutputs};

use crate::slot::Slot;

use peft_protocol::{ENV_INTERRUPT_FILE, ENV_KERNEL, ENV_STATE_DIR};

/// Where the prelude crate is: `$PEFT_PRELUDE_PATH` (the kernelspec sets it), else the copy
/// next to the kernel's own sources.
pub fn prelude_path() -> PathBuf {
    std::env::var_os("PEFT_PRELUDE_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft_prelude"))
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft_prelude"))
}

/// Must run before any thread starts: evcxr reads its config directory from the environment.
pub fn configure_process(slot: &Slot) {
    // SAFETY (edition 2021 has no unsafe marker): called from main before threads exist.
    std::env::set_var("EVCXR_CONFIG_DIR", slot.config_dir());
    std::env::set_var("EVCXR_TMPDIR", slot.build_dir());
}

/// The code that makes the prelude available to every cell: the prelude through its dylib
/// wrapper (see [`write_dylib_wrapper`]), renamed back to `peft_prelude`.
pub fn preload_code(wrapper: &Path) -> String {
    format!(
        ":dep peft_prelude_dylib = {{ path = {:?} }}\nuse peft_prelude_dylib as peft_prelude;\nuse peft_prelude::prelude::*;",
        wrapper.display().to_string()
    )
}

/// Writes `<slot>/prelude-dylib`, a crate of type `dylib` that re-exports the prelude.
///
/// evcxr links every cell statically, so each cell's library would carry its own copy of the
/// prelude and of candle, statics included. candle numbers tensors with a static counter: two
/// cells' copies hand out the same ids, and autograd (keyed by id) then mixes up tensors made
/// in different cells — a model loaded in one cell and trained in another fails in backward.
/// Linked as one shared library, the prelude and candle exist once in the process.
/// (evcxr's own dynamic mode, `allow_static_linking = false`, fails on this toolchain:
/// "only metadata stub found for `dylib` dependency `core`" for `no_std` dependencies.)
pub fn write_dylib_wrapper(slot: &Slot, prelude: &Path) -> Result<PathBuf> {
    let dir = slot.dir.join("prelude-dylib");
    std::fs::create_dir_all(dir.join("src"))?;
    let features = match std::env::var("PEFT_KERNEL_FEATURES") {
        Ok(f) if !f.trim().is_empty() => {
            let list: Vec<String> = f.split(',').map(|s| format!("{:?}", s.trim())).collect();
            format!(", features = [{}]", list.join(", "))
        }
        _ => String::new(),
    };
    let manifest = format!(
        "[package]\nname = \"peft_prelude_dylib\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [lib]\ncrate-type = [\"dylib\"]\n\n[dependencies]\npeft_prelude = {{ path = {:?}{features} }}\n\n\
         [workspace]\n",
        prelude.display().to_string()
    );
    write_if_changed(&dir.join("Cargo.toml"), &manifest)?;
    write_if_changed(&dir.join("src/lib.rs"), "pub use peft_prelude::*;\n")?;
    Ok(dir)
}

/// Leaves the file (and so cargo's fingerprint) alone when the content is the same.
fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() != Some(content) {
        std::fs::write(path, content)?;
    }
    Ok(())
}

/// The optimisation level cells are compiled at: `$PEFT_CELL_OPT`, else 0 (evcxr's default
/// is 2). A cell is glue around the prelude, which is optimised once in its shared library;
/// at 0 rustc compiles the notebook's cells that call generic prelude functions in about half
/// the time (1.3-1.6 s → 0.5-1.0 s on a 2-core Zen 4, the 14 cells 79 → 70-78 s) and its
/// training cells run as fast. A cell that loops over much data itself can ask for `:opt 2`.
fn cell_opt_level() -> String {
    std::env::var("PEFT_CELL_OPT")
        .ok()
        .filter(|level| !level.trim().is_empty())
        .unwrap_or_else(|| "0".to_string())
}

/// A running evcxr context.
pub struct Engine {
    pub ctx: CommandContext,
    pub process: Arc<Mutex<std::process::Child>>,
}

impl Engine {
    /// Has rust-analyzer read the prelude and every crate below it, without building or running
    /// anything. evcxr asks rust-analyzer for the type of each variable a cell defines, and the
    /// first such question loads all ~280 crates' item trees: 5 s the first `let` of a session
    /// would otherwise pay. Asking for a completion does the same loading.
    pub fn warm_analyzer(&mut self) {
        let code = "let _ = Tensor::zer";
        let _ = self.ctx.completions(code, code.len());
    }

    /// Starts the cell process and loads the prelude (compiling it when the slot is cold).
    /// Returns the output channels, which must be drained from then on.
    pub fn start(
        slot: &Slot,
        prelude: &Path,
        on_outputs: impl FnOnce(EvalContextOutputs),
    ) -> Result<Engine> {
        let started = Instant::now();
        let mut child = Command::new(std::env::current_exe()?);
        child
            .env(ENV_KERNEL, "1")
            .env(ENV_INTERRUPT_FILE, slot.interrupt_file())
            .env(ENV_STATE_DIR, slot.state_dir())
            .env("LD_LIBRARY_PATH", library_path(slot)?);
        let (eval, outputs) = EvalContext::with_subprocess_command(child)
            .map_err(|e| anyhow!("starting evcxr: {e}"))?;
        on_outputs(outputs);
        let context_ready = started.elapsed().as_secs_f64();
        let mut ctx = CommandContext::with_eval_context(eval);
        let level = cell_opt_level();
        ctx.set_opt_level(&level)
            .map_err(|e| anyhow!("PEFT_CELL_OPT={level}: {e}"))?;
        let wrapper = write_dylib_wrapper(slot, prelude)?;
        ctx.execute(&preload_code(&wrapper)).map_err(|e| {
            anyhow!(
                "loading peft_prelude from {}:\n{}",
                prelude.display(),
                crate::errors::plain(&e)
            )
        })?;
        slot.mark_warm()?;
        eprintln!(
            "peft-kernel: prelude ready in {:.1} s (evcxr context {context_ready:.1} s)",
            started.elapsed().as_secs_f64()
        );
        let process = ctx.process_handle();
        Ok(Engine { ctx, process })
    }
}

/// evcxr links cells with an rpath relative to `target/<triple>/debug/deps` but loads them from
/// one directory up, so libstd's shared library is not found in a persistent build directory:
/// put the toolchain's library directory on the loader path, and the slot's `deps` folders
/// (where the prelude's shared library is).
fn library_path(slot: &Slot) -> Result<String> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot (is the Rust toolchain on PATH?)")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let verbose = Command::new("rustc").arg("-vV").output()?;
    let host = String::from_utf8_lossy(&verbose.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV printed no host")?;
    let target = slot.build_dir().join("target");
    let dir = format!(
        "{sysroot}/lib/rustlib/{host}/lib:{}:{}",
        target.join(&host).join("debug/deps").display(),
        target.join("debug/deps").display()
    );
    Ok(match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{dir}:{old}"),
        _ => dir,
    })
}
