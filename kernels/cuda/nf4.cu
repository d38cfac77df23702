// NF4 dequantization (bitsandbytes' layout): two 4-bit codes per byte, the first element in
// the high nibble; value = code[nibble] * absmax[element / blocksize], computed in f32 and
// rounded once to the output type. The absmax is either plain f32 or double-quantized:
// absmax[b] = map[qabsmax[b]] * nested[b / nested_blocksize] + offset (multiply, then add).
// One thread per packed byte; blocksize is even, so both elements share a block.
#include "common.cuh"

template <typename T, bool NESTED>
__device__ void nf4_dequant(const uint8_t* packed, const float* code16, const float* absmax,
                            const uint8_t* qabsmax, const float* map256, const float* nested,
                            uint32_t nested_blocksize, float offset, uint32_t blocksize, T* out,
                            uint64_t n) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
  __syncthreads();
  const uint64_t bytes = (n + 1) / 2;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < bytes;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t e = 2 * i;
    const uint64_t b = e / blocksize;
    float s;
    if (NESTED) {
      s = __fadd_rn(__fmul_rn(map256[qabsmax[b]], nested[b / nested_blocksize]), offset);
    } else {
      s = absmax[b];
    }
    const uint8_t v = packed[i];
    out[e] = from_f32<T>(__fmul_rn(code[v >> 4], s));
    if (e + 1 < n) out[e + 1] = from_f32<T>(__fmul_rn(code[v & 15], s));
  }
}

#define NF4(T, S)                                                                             \
  extern "C" __global__ void nf4_dequant_plain_##S(const uint8_t* packed, const float* code16, \
                                                   const float* absmax, uint32_t blocksize,    \
                                                   T* out, uint64_t n) {                       \
    nf4_dequant<T, false>(packed, code16, absmax, nullptr, nullptr, nullptr, 1, 0.f,           \
                          blocksize, out, n);                                                  \
  }                                                                                            \
  extern "C" __global__ void nf4_dequant_nested_##S(                                           \
      const uint8_t* packed, const float* code16, const uint8_t* qabsmax, const float* map256, \
      const float* nested, uint32_t nested_blocksize, float offset, uint32_t blocksize, T* out, \
      uint64_t n) {                                                                            \
    nf4_dequant<T, true>(packed, code16, nullptr, qabsmax, map256, nested, nested_blocksize,   \
                         offset, blocksize, out, n);                                           \
  }
PEFT_INSTANTIATE(NF4)
