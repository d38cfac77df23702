//! Compiles `../cuda/*.cu` as C++ against the emulation headers in `include/` (no CUDA toolkit),
//! together with the emulated launch in `src/runtime.cpp`, into one static library.

use std::path::Path;

fn main() {
    let cuda = Path::new("../cuda");
    println!("cargo::rerun-if-changed=../cuda");
    println!("cargo::rerun-if-changed=include");
    println!("cargo::rerun-if-changed=src/runtime.cpp");
    let mut sources: Vec<_> = std::fs::read_dir(cuda)
        .expect("kernels/cuda is beside this crate")
        .map(|e| e.expect("readable kernels/cuda").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include("include")
        .flag("-x")
        .flag("c++")
        .flag("-include")
        .flag("emu.h")
        // The GPU rounds every multiply and add unless the source asks for fma: do the same.
        .flag("-ffp-contract=off")
        .flag_if_supported("-Wno-unused-parameter")
        .opt_level(2)
        .files(&sources)
        .file("src/runtime.cpp")
        .compile("peft_cuda_emu");
}
