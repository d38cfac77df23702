//! With the `cuda` feature, compiles `cuda/*.cu` to PTX with nvcc (through cudaforge, as
//! candle-kernels does) and writes `OUT_DIR/ptx.rs` with one `&str` constant per file.
//! Without it, does nothing: the CPU build needs no CUDA toolkit.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    pub fn build() {
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_glob("cuda/*.cu")
            .watch(["cuda/common.cuh"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .expect("nvcc --ptx of kernels/cuda/*.cu (set CUDA_COMPUTE_CAP without a GPU)");
        ptx.write(out.join("ptx.rs")).expect("write ptx.rs");
    }
}
