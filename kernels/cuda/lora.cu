// The rank-r part of LoRA, added in place: y[i, o] += scale * sum_k xa[i, k] * b(k, o), with
// b(k, o) read at k * sk + o * so (B^T in the forward, A in the backward's dx). r is small
// (<= 256), so one thread per output element with an f32 dot product is enough; the big
// products go through cuBLAS.
#include "common.cuh"

template <typename T>
__device__ void add_low_rank(T* y, const T* xa, const T* b, uint32_t m, uint32_t n, uint32_t r,
                             uint64_t sk, uint64_t so, float scale) {
  const uint64_t total = (uint64_t)m * n;
  for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t i = idx / n, o = idx % n;
    const T* xr = xa + i * r;
    float acc = 0.f;
    for (uint32_t k = 0; k < r; ++k) acc += to_f32(xr[k]) * to_f32(b[k * sk + o * so]);
    y[idx] = from_f32<T>(to_f32(y[idx]) + scale * acc);
  }
}

#define ADD_LOW_RANK(T, S)                                                                    \
  extern "C" __global__ void add_low_rank_##S(T* y, const T* xa, const T* b, uint32_t m,       \
                                              uint32_t n, uint32_t r, uint64_t sk, uint64_t so, \
                                              float scale) {                                   \
    add_low_rank<T>(y, xa, b, m, n, r, sk, so, scale);                                        \
  }
PEFT_INSTANTIATE(ADD_LOW_RANK)
