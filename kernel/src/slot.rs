//! Persistent build directories ("slots") under the kernel's cache directory.
//!
//! evcxr's build directory holds the compiled prelude and candle; keeping it between sessions
//! is what makes a restart fast. Two evcxr instances must never share one (they would
//! overwrite each other's `ctx` library), so each kernel takes the first slot whose lock it can
//! get, and a fresh slot is seeded by copying a warm one.

use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// How many kernels may run at once before the next one waits.
const MAX_SLOTS: usize = 8;

/// A locked slot; the lock is held for as long as this value lives.
#[derive(Debug)]
pub struct Slot {
    pub dir: PathBuf,
    _lock: File,
}

impl Slot {
    /// evcxr's build directory (its `tmpdir`).
    pub fn build_dir(&self) -> PathBuf {
        self.dir.join("build")
    }

    /// The kernel-owned evcxr config directory (holds `evcxr.toml`).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// The file through which the kernel tells the cell process about interrupts.
    /// The side-channel folder of the cell process (widget state, background-run markers).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn interrupt_file(&self) -> PathBuf {
        self.dir.join("interrupt")
    }

    fn warm_marker(&self) -> PathBuf {
        self.dir.join("warm")
    }

    pub fn is_warm(&self) -> bool {
        self.warm_marker().exists()
    }

    pub fn mark_warm(&self) -> Result<()> {
        fs::write(self.warm_marker(), b"").context("marking the build slot warm")
    }
}

/// The kernel's cache directory: `$PEFT_KERNEL_CACHE`, else `~/.cache/peft-kernel`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("PEFT_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/peft-kernel"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Locks the first free slot, preparing its configuration. `workspace_lock` (the prelude
/// workspace's Cargo.lock) pins the versions of the prelude's dependencies in a new slot.
pub fn acquire(workspace_lock: Option<&Path>) -> Result<Slot> {
    let root = cache_root();
    for n in 0..MAX_SLOTS {
        let dir = root.join(format!("slot-{n}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = File::create(dir.join("lock"))?;
        // SAFETY: flock on a file descriptor we own; released when the file is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let slot = Slot { dir, _lock: lock };
        if !slot.is_warm() && n > 0 {
            seed_from(&root.join("slot-0"), &slot);
        }
        prepare(&slot, workspace_lock)?;
        return Ok(slot);
    }
    bail!(
        "all {MAX_SLOTS} build slots in {} are in use by running kernels; stop one",
        root.display()
    )
}

/// Copies a warm slot's build directory so a second kernel does not compile candle again.
/// Best effort: a failed copy only means a slower first cell.
fn seed_from(warm: &Path, slot: &Slot) {
    if !warm.join("warm").exists() {
        return;
    }
    eprintln!(
        "peft-kernel: seeding {} from {}",
        slot.dir.display(),
        warm.display()
    );
    let _ = fs::remove_dir_all(slot.build_dir());
    let status = Command::new("cp")
        .arg("-a")
        .arg(warm.join("build"))
        .arg(slot.build_dir())
        .status();
    if status.is_ok_and(|s| s.success()) {
        let _ = slot.mark_warm();
    }
}

/// Procedural macros (and the parsers they use) in the prelude's dependency graph: they only
/// run inside the compiler, so they are built unoptimised (a fifth of the time at opt-level 3,
/// and expansion is no slower to notice). Listed by name because a name outranks `"*"` in
/// cargo's profile overrides; a name cargo does not find only costs a warning, so the list
/// follows the prelude's graph (the workspace's Cargo.toml holds the same for its builds).
const PROC_MACRO_CRATES: &[&str] = &[
    "bytemuck_derive",
    "darling_core",
    "darling_macro",
    "derive_builder_core",
    "derive_builder_macro",
    "dyn-stack-macros",
    "macro_rules_attribute-proc_macro",
    "monostate-impl",
    "paste",
    "pastey",
    "proc-macro2",
    "quote",
    "rustversion",
    "seq-macro",
    "serde_derive",
    "syn",
    "synstructure",
    "thiserror-impl",
    "yoke-derive",
    "zerocopy-derive",
    "zerofrom-derive",
    "zeroize_derive",
];

/// Dependencies whose speed no cell notices, built with less optimisation (first build, issue
/// 20): gemm's complex-number kernels (candle has no complex dtype), chat-template rendering,
/// chart drawing and font layout, and the zip reader of candle's `.npy`/`.pth` loaders.
const COLD_CRATES: &[(&str, u8)] = &[
    ("gemm-c32", 0),
    ("gemm-c64", 0),
    ("gemm-f64", 1),
    ("minijinja", 1),
    ("plotters", 1),
    ("ttf-parser", 1),
    ("owned_ttf_parser", 1),
    ("ab_glyph", 1),
    ("ab_glyph_rasterizer", 1),
    ("zip", 1),
];

/// The slot's cargo configuration: dependencies fully optimised and without the debug
/// assertions and overflow checks evcxr's profile turns on (a 135M-parameter forward pass is
/// unusable with them), procedural macros unoptimised, [`COLD_CRATES`] at their levels.
fn slot_cargo_config() -> String {
    let mut config = String::from(
        "[profile.dev.package.\"*\"]\nopt-level = 3\ndebug-assertions = false\noverflow-checks = false\n",
    );
    let levels = PROC_MACRO_CRATES
        .iter()
        .map(|name| (*name, 0))
        .chain(COLD_CRATES.iter().copied());
    for (name, level) in levels {
        config.push_str(&format!(
            "\n[profile.dev.package.{name:?}]\nopt-level = {level}\n"
        ));
    }
    config
}

/// Recorded in each slot, so that a slot built with another linking mode is rebuilt.
const LINKING_MODE: &str = "static+prelude-dylib";

/// Writes the configuration evcxr reads at start. Settings that change how dependencies are
/// compiled live here (not in `:` commands), because evcxr runs `cargo clean` when
/// `allow_static_linking` differs from the previous compile.
///
/// Cells are linked statically (evcxr's default); the prelude itself is one shared library,
/// see `engine::write_dylib_wrapper`.
fn prepare(slot: &Slot, workspace_lock: Option<&Path>) -> Result<()> {
    let build = slot.build_dir();
    fs::create_dir_all(&build)?;
    fs::create_dir_all(slot.config_dir())?;
    let toml = format!(
        "[evcxr]\ntmpdir = {:?}\npreserve_vars_on_panic = true\nallow_static_linking = true\n",
        build.display().to_string()
    );
    fs::write(slot.config_dir().join("evcxr.toml"), toml)?;
    // evcxr only cleans the build when the linking mode changes within one process; a slot
    // built with the other mode by an earlier kernel version must be rebuilt from scratch.
    let mode_file = slot.dir.join("linking-mode");
    if fs::read_to_string(&mode_file).ok().as_deref() != Some(LINKING_MODE) {
        let _ = fs::remove_dir_all(build.join("target"));
        fs::write(&mode_file, LINKING_MODE)?;
    }
    // Cargo merges config files from the build directory's ancestors; evcxr owns the one in
    // the build directory itself. User cells keep evcxr's settings.
    let cargo_dir = slot.dir.join(".cargo");
    fs::create_dir_all(&cargo_dir)?;
    fs::write(cargo_dir.join("config.toml"), slot_cargo_config())?;
    // Refreshed whenever the workspace's lock file changes, so the prelude is built against
    // the same dependency versions as the workspace (and its tests).
    if let Some(lock) = workspace_lock.filter(|l| l.is_file()) {
        let target = build.join("Cargo.lock");
        let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        if modified(&target).is_none() || modified(lock) > modified(&target) {
            fs::copy(lock, &target).context("copying the workspace Cargo.lock")?;
        }
    }
    fs::write(slot.interrupt_file(), b"0")?;
    Ok(())
}
