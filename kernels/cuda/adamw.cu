// AdamW, bit-exact with the CPU ops in src/adamw.rs (and with them torch's CPU AdamW): every
// operation is written with its rounding spelled out (__fmul_rn and friends are never fused
// into an fma by nvcc; fmaf is where torch fuses).
//   adamw_moments_f32: (g, state [m; v]) -> state'          one thread per element
//   adamw_param_f32:   (p, g, state [m; v]) -> p'           the new moments recomputed
//   adamw8_moments:    (g, 8-bit state) -> 8-bit state'     one 256-thread block per block
//   adamw8_param:      (p, g, 8-bit state) -> p'            from the unrounded new moments
// 8-bit state layout (src/adamw/adamw8.rs): m codes [n], v codes [n], padding to 4 bytes, then
// m scales [nb] and v scales [nb] as f32, nb = ceil(n / 256).
#include "common.cuh"

struct AdamW {
  float decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;

  __device__ __forceinline__ void moments(float g, float& m, float& v) const {
    const float m2 = fmaf(one_minus_beta1, __fsub_rn(g, m), m);
    const float v2 = fmaf(__fmul_rn(one_minus_beta2, g), g, __fmul_rn(v, beta2));
    m = m2;
    v = v2;
  }

  __device__ __forceinline__ float param(float p, float m, float v) const {
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
    return __fadd_rn(__fmul_rn(p, decay), __fdiv_rn(__fmul_rn(-step_size, m), denom));
  }
};

#define ADAMW_ARGS                                                                           \
  float decay, float one_minus_beta1, float beta2, float one_minus_beta2, float step_size,   \
      float bc2_sqrt, float eps
#define ADAMW_MAKE \
  AdamW{decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps}

extern "C" __global__ void adamw_moments_f32(const float* g, const float* st, float* out,
                                             uint64_t n, ADAMW_ARGS) {
  const AdamW s = ADAMW_MAKE;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    float m = st[i], v = st[n + i];
    s.moments(g[i], m, v);
    out[i] = m;
    out[n + i] = v;
  }
}

extern "C" __global__ void adamw_param_f32(const float* p, const float* g, const float* st,
                                           float* out, uint64_t n, ADAMW_ARGS) {
  const AdamW s = ADAMW_MAKE;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    float m = st[i], v = st[n + i];
    s.moments(g[i], m, v);
    out[i] = s.param(p[i], m, v);
  }
}

#define ADAM8_BLOCK 256

__device__ __forceinline__ float decode_signed(uint8_t c, float scale) {
  return __fmul_rn(__fdiv_rn(__fsub_rn((float)c, 128.f), 127.f), scale);
}

__device__ __forceinline__ float decode_unsigned(uint8_t c, float scale) {
  const float r = __fmul_rn(__fdiv_rn((float)c, 255.f), scale);
  return __fmul_rn(r, r);
}

__device__ __forceinline__ uint8_t encode_signed(float m, float absmax) {
  const float inv = absmax > 0.f ? __fdiv_rn(127.f, absmax) : 0.f;
  return (uint8_t)fminf(fmaxf(__fadd_rn(roundf(__fmul_rn(m, inv)), 128.f), 1.f), 255.f);
}

__device__ __forceinline__ uint8_t encode_unsigned(float root, float max_root) {
  const float inv = max_root > 0.f ? __fdiv_rn(255.f, max_root) : 0.f;
  return (uint8_t)fminf(fmaxf(roundf(__fmul_rn(root, inv)), 0.f), 255.f);
}

// The decoded old moments of element i (< n).
__device__ __forceinline__ void load8(const uint8_t* st, uint64_t n, uint32_t scales_offset,
                                      uint64_t i, float& m, float& v) {
  const float* scales = (const float*)(st + scales_offset);
  const uint64_t nb = (n + ADAM8_BLOCK - 1) / ADAM8_BLOCK, b = i / ADAM8_BLOCK;
  m = decode_signed(st[i], scales[b]);
  v = decode_unsigned(st[n + i], scales[nb + b]);
}

// One block of ADAM8_BLOCK threads per quantization block; bytes between the codes and the
// scales (padding) are left to the caller (zeroed allocation).
extern "C" __global__ void adamw8_moments(const float* g, const uint8_t* st, uint8_t* out,
                                          uint64_t n, uint32_t scales_offset, ADAMW_ARGS) {
  __shared__ float scratch[32];
  const AdamW s = ADAMW_MAKE;
  const uint64_t b = blockIdx.x, i = b * ADAM8_BLOCK + threadIdx.x;
  const uint64_t nb = (n + ADAM8_BLOCK - 1) / ADAM8_BLOCK;
  const bool inside = i < n;
  float m = 0.f, v = 0.f;
  if (inside) {
    load8(st, n, scales_offset, i, m, v);
    s.moments(g[i], m, v);
  }
  const float root = __fsqrt_rn(fmaxf(v, 0.f));
  const float absmax = block_max(inside ? fabsf(m) : 0.f, scratch);
  const float max_root = block_max(inside ? root : 0.f, scratch);
  float* scales = (float*)(out + scales_offset);
  if (threadIdx.x == 0) {
    scales[b] = absmax;
    scales[nb + b] = max_root;
  }
  if (inside) {
    out[i] = encode_signed(m, absmax);
    out[n + i] = encode_unsigned(root, max_root);
  }
}

extern "C" __global__ void adamw8_param(const float* p, const float* g, const uint8_t* st,
                                        float* out, uint64_t n, uint32_t scales_offset,
                                        ADAMW_ARGS) {
  const AdamW s = ADAMW_MAKE;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    float m, v;
    load8(st, n, scales_offset, i, m, v);
    s.moments(g[i], m, v);
    out[i] = s.param(p[i], m, v);
  }
}
