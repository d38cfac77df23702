// Compiles the CUDA kernels in ../../cuda/*.cu as ordinary C++ so their logic can be tested on
// a machine without a GPU (see ../README.md). Force-included before every kernel source.
//
// Model: one launch runs its blocks one after another; the threads of a block are real OS
// threads (so __syncthreads is a barrier and __shared__ memory is shared), and warp shuffles
// exchange through memory between two block-wide barriers. That last point is stricter than a
// GPU: every thread of the block must reach every shuffle, which the block reductions in
// common.cuh do. Arithmetic is IEEE f32 without contraction; __expf is expf (the GPU's is
// ~2 ulp coarser), so comparisons with the GPU's own results need a tolerance, not equality.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

struct dim3 {
  uint32_t x, y, z;
};

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One block runs at a time (launches are serialised), so a static is the block's shared memory.
#define __shared__ static

void __syncthreads();
float peft_emu_shfl_xor(float v, int lane_mask);

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return peft_emu_shfl_xor(v, lane_mask);
}
inline float __expf(float x) { return expf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
