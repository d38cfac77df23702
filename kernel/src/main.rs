//! The Jupyter kernel "Rust (PEFT)". A stub until the kernel issue lands.

fn main() {
    eprintln!("peft-kernel: the Jupyter kernel is not built yet; see README.md");
    std::process::exit(2);
}
