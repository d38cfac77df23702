// RMSNorm with a frozen weight. One block per row; f32 accumulation.
//   forward:  y = w * x * r,                 r = 1 / sqrt(mean(x^2) + eps)
//   backward: dx = r * w * dy - x * r^3 * sum(w * dy * x) / d
#include "common.cuh"

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, uint32_t d, float eps) {
  __shared__ float scratch[32];
  const size_t row = (size_t)blockIdx.x * d;
  float ss = 0.f;
  for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = to_f32(x[row + i]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss, scratch) / d + eps);
  for (uint32_t i = threadIdx.x; i < d; i += blockDim.x)
    y[row + i] = from_f32<T>(to_f32(w[i]) * (to_f32(x[row + i]) * r));
}

template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* dy, T* dx, uint32_t d, float eps) {
  __shared__ float scratch[32];
  const size_t row = (size_t)blockIdx.x * d;
  float ss = 0.f, dot = 0.f;
  for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = to_f32(x[row + i]);
    ss += v * v;
    dot += to_f32(dy[row + i]) * to_f32(w[i]) * v;
  }
  ss = block_sum(ss, scratch);
  dot = block_sum(dot, scratch);
  const float r = rsqrtf(ss / d + eps);
  const float c = r * r * r * dot / d;
  for (uint32_t i = threadIdx.x; i < d; i += blockDim.x)
    dx[row + i] = from_f32<T>(r * to_f32(dy[row + i]) * to_f32(w[i]) - c * to_f32(x[row + i]));
}

#define RMS_NORM(T, S)                                                                        \
  extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, uint32_t d,        \
                                              float eps) {                                     \
    rms_norm_fwd<T>(x, w, y, d, eps);                                                         \
  }                                                                                           \
  extern "C" __global__ void rms_norm_bwd_##S(const T* x, const T* w, const T* dy, T* dx,      \
                                              uint32_t d, float eps) {                         \
    rms_norm_bwd<T>(x, w, dy, dx, d, eps);                                                    \
  }
PEFT_INSTANTIATE(RMS_NORM)
