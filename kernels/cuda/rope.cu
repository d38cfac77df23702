// RoPE, Hugging Face rotate-half layout, for x [b, h, t, d] read through strides (last dim
// contiguous), tables [b or 1, t, d] contiguous, output contiguous [b, h, t, d].
// One thread per (row, i < d/2) pair of elements.
//   forward:            y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
//   transpose (bwd):    y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1
#include "common.cuh"

template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, uint32_t b, uint32_t h,
                     uint32_t t, uint32_t d, uint64_t xs0, uint64_t xs1, uint64_t xs2,
                     uint32_t per_batch, uint32_t transpose) {
  const uint32_t half = d / 2;
  const uint64_t n = (uint64_t)b * h * t * half;
  for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
       idx += (uint64_t)gridDim.x * blockDim.x) {
    const uint32_t i = idx % half;
    const uint64_t row = idx / half;  // (bi, hi, ti) flattened
    const uint32_t ti = row % t;
    const uint32_t hi = (row / t) % h;
    const uint32_t bi = row / ((uint64_t)t * h);
    const T* xr = x + bi * xs0 + hi * xs1 + ti * xs2;
    const uint64_t tab = ((per_batch ? (uint64_t)bi * t : 0) + ti) * d;
    const float x1 = to_f32(xr[i]), x2 = to_f32(xr[i + half]);
    const float c1 = to_f32(cos[tab + i]), c2 = to_f32(cos[tab + i + half]);
    const float s1 = to_f32(sin[tab + i]), s2 = to_f32(sin[tab + i + half]);
    float y1, y2;
    if (transpose) {
      y1 = x1 * c1 + x2 * s2;
      y2 = x2 * c2 - x1 * s1;
    } else {
      y1 = x1 * c1 - x2 * s1;
      y2 = x2 * c2 + x1 * s2;
    }
    T* yr = y + row * d;
    yr[i] = from_f32<T>(y1);
    yr[i + half] = from_f32<T>(y2);
  }
}

#define ROPE(T, S)                                                                             \
  extern "C" __global__ void rope_##S(const T* x, const T* cos, const T* sin, T* y, uint32_t b, \
                                      uint32_t h, uint32_t t, uint32_t d, uint64_t xs0,          \
                                      uint64_t xs1, uint64_t xs2, uint32_t per_batch,            \
                                      uint32_t transpose) {                                      \
    rope<T>(x, cos, sin, y, b, h, t, d, xs0, xs1, xs2, per_batch, transpose);                   \
  }
PEFT_INSTANTIATE(ROPE)
