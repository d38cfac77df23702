//! `peft-kernel`: the Jupyter kernel "Rust (PEFT)": evcxr with `peft_prelude` preloaded, live
//! displays and a cooperative interrupt. See `peft-kernel --help`.

mod comms;
mod complete;
mod early_return;
mod engine;
mod errors;
mod executor;
mod install;
mod interrupt;
mod messages;
mod output;
mod run;
mod server;
mod slot;
mod stderr_capture;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "peft-kernel",
    version,
    about = "Jupyter kernel for Rust with peft_prelude preloaded"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Registers the kernelspec "Rust (PEFT)" and warms the build cache.
    Install {
        #[command(flatten)]
        location: LocationArgs,
        /// Do not compile the prelude now (the first session will).
        #[arg(long)]
        no_warm: bool,
    },
    /// Removes the kernelspec.
    Uninstall {
        #[command(flatten)]
        location: LocationArgs,
    },
    /// Compiles the prelude into the build cache so that the first cell is fast.
    Warm,
    /// Executes a notebook headlessly and writes its outputs.
    Run {
        notebook: PathBuf,
        /// Where to write the executed notebook (default: in place).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run every cell even after one fails.
        #[arg(long)]
        allow_errors: bool,
    },
    /// Runs the kernel for a Jupyter client (what the kernelspec's argv says).
    Start {
        #[arg(long = "connection-file", short = 'f')]
        connection_file: PathBuf,
    },
}

#[derive(Args)]
#[group(multiple = false)]
struct LocationArgs {
    /// Into the user's Jupyter data directory (the default).
    #[arg(long)]
    user: bool,
    /// Into the data directory of the Python environment that runs Jupyter.
    #[arg(long)]
    sys_prefix: bool,
    /// Into PREFIX/share/jupyter.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<PathBuf>,
}

impl LocationArgs {
    fn location(&self) -> install::Location {
        match (&self.prefix, self.sys_prefix) {
            (Some(p), _) => install::Location::Prefix(p.clone()),
            (None, true) => install::Location::SysPrefix,
            _ => install::Location::User,
        }
    }
}

fn main() -> Result<()> {
    // In the cell process (and as evcxr's rustc wrapper) this runs evcxr and never returns.
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
        early_return::watch_cell_stdout();
    }
    evcxr::runtime_hook();
    ensure_cargo_on_path();
    forget_cargo_package_env();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Install { location, no_warm } => {
            let binary = std::env::current_exe()?.canonicalize()?;
            let dir = install::install(&location.location(), &binary, &engine::prelude_path())?;
            println!(
                "Installed kernelspec {} in {}",
                install::KERNEL_NAME,
                dir.display()
            );
            if !no_warm {
                warm()?;
            }
        }
        Cmd::Uninstall { location } => match install::uninstall(&location.location())? {
            Some(dir) => println!("Removed {}", dir.display()),
            None => println!("No kernelspec {} to remove", install::KERNEL_NAME),
        },
        Cmd::Warm => warm()?,
        Cmd::Run {
            notebook,
            out,
            allow_errors,
        } => {
            let slot = take_slot()?;
            let out = out.unwrap_or_else(|| notebook.clone());
            run::run(&notebook, &out, &slot, allow_errors)?;
            println!("Wrote {}", out.display());
        }
        Cmd::Start { connection_file } => {
            let slot = take_slot()?;
            let cargo_status = stderr_capture::capture();
            server::serve(&connection_file, slot, cargo_status)?;
        }
    }
    Ok(())
}

/// Locks a build slot and points evcxr at it (before any thread starts).
fn take_slot() -> Result<slot::Slot> {
    let lock = engine::prelude_path().join("../Cargo.lock");
    let slot = slot::acquire(Some(&lock)).context("taking a build slot")?;
    engine::configure_process(&slot);
    Ok(slot)
}

fn warm() -> Result<()> {
    let start = Instant::now();
    let slot = take_slot()?;
    eprintln!(
        "Warming {} (the first time compiles candle and the prelude: several minutes)",
        slot.dir.display()
    );
    let mut engine = engine::Engine::start(&slot, &engine::prelude_path(), |outputs| {
        // Nothing to show; keep the channels drained.
        std::thread::spawn(move || while outputs.stdout.recv().is_ok() {});
        std::thread::spawn(move || while outputs.stderr.recv().is_ok() {});
    })?;
    engine
        .ctx
        .execute("let __peft_warm: u8 = 0;")
        .map_err(|e| anyhow::anyhow!("{}", errors::plain(&e)))?;
    println!(
        "Build cache warm ({:.0} s): {}",
        start.elapsed().as_secs_f64(),
        slot.dir.display()
    );
    Ok(())
}

/// Jupyter started from a desktop often lacks ~/.cargo/bin on PATH; evcxr needs cargo.
/// Drops the variables cargo sets for a package it builds or runs (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, ...), present when the kernel is started from `cargo test` or
/// `cargo run`. evcxr's cargo inherits them, and build scripts (ring's, cc's) name them in
/// `rerun-if-env-changed`: the slot's warm build would be redone, minutes, each time the kernel
/// is started from a different package. Only for the kernel: evcxr's hooks above have returned.
fn forget_cargo_package_env() {
    let names: Vec<_> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k.starts_with("CARGO_CFG_")
                || matches!(
                    k.as_str(),
                    "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "OUT_DIR"
                        | "CARGO_TARGET_TMPDIR"
                )
        })
        .collect();
    for name in names {
        // Before any thread starts.
        std::env::remove_var(name);
    }
}

fn ensure_cargo_on_path() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let has_cargo = std::env::split_paths(&path).any(|p| p.join("cargo").is_file());
    if let (false, Some(home)) = (has_cargo, std::env::var_os("HOME")) {
        let mut dirs = vec![PathBuf::from(home).join(".cargo/bin")];
        dirs.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(dirs) {
            // Before any thread starts.
            std::env::set_var("PATH", joined);
        }
    }
}
