//! The command line: install / uninstall write and remove the kernelspec. (Also makes
//! `cargo test --workspace` build the binary that tests/kernel_jupyter.rs drives.)

use std::process::Command;

#[test]
fn install_writes_a_kernelspec_and_uninstall_removes_it() {
    let prefix = std::env::temp_dir().join(format!("peft-kernel-cli-{}", std::process::id()));
    let bin = env!("CARGO_BIN_EXE_peft-kernel");
    let out = Command::new(bin)
        .args(["install", "--no-warm", "--prefix"])
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = prefix.join("share/jupyter/kernels/rust-peft");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("kernel.json")).unwrap()).unwrap();
    assert_eq!(spec["display_name"], "Rust (PEFT)");
    assert_eq!(spec["language"], "rust");
    assert_eq!(spec["interrupt_mode"], "message");
    let argv: Vec<&str> = spec["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(std::path::Path::new(argv[0]).is_absolute());
    assert_eq!(
        &argv[1..],
        ["start", "--connection-file", "{connection_file}"]
    );
    let prelude = spec["env"]["PEFT_PRELUDE_PATH"].as_str().unwrap();
    assert!(
        std::path::Path::new(prelude).join("Cargo.toml").is_file(),
        "{prelude}"
    );
    for logo in ["logo-32x32.png", "logo-64x64.png", "logo-svg.svg"] {
        assert!(dir.join(logo).is_file(), "{logo}");
    }
    let out = Command::new(bin)
        .args(["uninstall", "--prefix"])
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!dir.exists());
    let _ = std::fs::remove_dir_all(&prefix);
}
