//! The launch geometry of the CUDA kernels in `cuda/*.cu`: decided here, without the `cuda`
//! feature, so the CPU emulation of those kernels (`kernels/cuda-emu`) launches them exactly as
//! the CUDA launchers do.

/// A 1-D grid of `grid` blocks of `block` threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: u32,
    pub block: u32,
}

/// Threads per block of the element-wise kernels (RoPE, SwiGLU, LoRA's rank-r add, NF4
/// dequantization, the cross-entropy's in-place exp).
pub const ELEMENTWISE_THREADS: u32 = 256;

/// At most this many blocks: the element-wise kernels loop over the rest (grid-stride loops).
const MAX_BLOCKS: usize = 65535 * 8;

/// For a grid-stride kernel over `n` items.
pub fn elementwise(n: usize) -> Geometry {
    let threads = ELEMENTWISE_THREADS;
    Geometry {
        grid: n.div_ceil(threads as usize).clamp(1, MAX_BLOCKS) as u32,
        block: threads,
    }
}

/// One block per row of `d` elements, a multiple of 32 threads (the block reductions need
/// whole warps), at most 1024 (longer rows loop).
pub fn one_block_per_row(rows: usize, d: usize) -> Geometry {
    Geometry {
        grid: rows as u32,
        block: (d.div_ceil(32) * 32).clamp(32, 1024) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_blocks_are_whole_warps_within_the_hardware_limit() {
        for d in [1, 31, 32, 33, 576, 1024, 1025, 4096, 32000] {
            let g = one_block_per_row(7, d);
            assert_eq!(g.grid, 7);
            assert_eq!(g.block % 32, 0, "d = {d}");
            assert!((32..=1024).contains(&g.block), "d = {d}");
        }
    }

    #[test]
    fn elementwise_grids_cover_small_inputs_and_cap_large_ones() {
        assert_eq!(elementwise(0).grid, 1);
        assert_eq!(elementwise(257).grid, 2);
        assert_eq!(elementwise(1 << 40).grid as usize, MAX_BLOCKS);
    }
}
