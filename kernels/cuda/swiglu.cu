// SwiGLU h = silu(g) * u, and its backward into one [2, n] buffer: [d_gate, d_up].
#include "common.cuh"

template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* h, uint64_t n) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const float gv = to_f32(g[i]);
    h[i] = from_f32<T>(gv / (1.f + __expf(-gv)) * to_f32(u[i]));
  }
}

template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dh, T* out, uint64_t n) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const float gv = to_f32(g[i]), uv = to_f32(u[i]), d = to_f32(dh[i]);
    const float sig = 1.f / (1.f + __expf(-gv));
    const float silu = gv * sig;
    out[i] = from_f32<T>(d * uv * (sig + silu * (1.f - sig)));
    out[n + i] = from_f32<T>(d * silu);
  }
}

#define SWIGLU(T, S)                                                                          \
  extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* h, uint64_t n) {       \
    swiglu_fwd<T>(g, u, h, n);                                                                \
  }                                                                                           \
  extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dh, T* out,       \
                                            uint64_t n) {                                     \
    swiglu_bwd<T>(g, u, dh, out, n);                                                          \
  }
PEFT_INSTANTIATE(SWIGLU)
