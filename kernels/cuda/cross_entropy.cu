// Chunked cross-entropy: per vocabulary chunk of c columns starting at v0.
//   ce_chunk_stats: one block per row, state [n, 4] f32 (m, s, target logit, alpha) ->
//                   m' = max(m, max l), s' = s e^{m - m'} + sum e^{l - m'}, alpha = e^{m - m'}
//   ce_exp_shifted: l <- e^{l - m'} in place (the unnormalised softmax of the chunk)
#include "common.cuh"

template <typename T>
__device__ void ce_chunk_stats(const T* logits, const uint32_t* targets, const float* st,
                               float* out, uint32_t c, uint32_t v0) {
  __shared__ float scratch[32];
  const uint32_t row = blockIdx.x;
  const T* l = logits + (size_t)row * c;
  const float m_old = st[row * 4 + 0];
  float m = -INFINITY;
  for (uint32_t i = threadIdx.x; i < c; i += blockDim.x) m = fmaxf(m, to_f32(l[i]));
  m = fmaxf(block_max(m, scratch), m_old);
  float s = 0.f;
  for (uint32_t i = threadIdx.x; i < c; i += blockDim.x) s += __expf(to_f32(l[i]) - m);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    const float alpha = __expf(m_old - m);
    const uint32_t t = targets[row];
    const float tgt = (t >= v0 && t < v0 + c) ? to_f32(l[t - v0]) : 0.f;
    out[row * 4 + 0] = m;
    out[row * 4 + 1] = st[row * 4 + 1] * alpha + s;
    out[row * 4 + 2] = st[row * 4 + 2] + tgt;
    out[row * 4 + 3] = alpha;
  }
}

template <typename T>
__device__ void ce_exp_shifted(T* logits, const float* st, uint32_t n, uint32_t c) {
  const uint64_t total = (uint64_t)n * c;
  for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t row = idx / c;
    logits[idx] = from_f32<T>(__expf(to_f32(logits[idx]) - st[row * 4]));
  }
}

#define CROSS_ENTROPY(T, S)                                                                   \
  extern "C" __global__ void ce_chunk_stats_##S(const T* logits, const uint32_t* targets,     \
                                                const float* st, float* out, uint32_t c,      \
                                                uint32_t v0) {                                \
    ce_chunk_stats<T>(logits, targets, st, out, c, v0);                                       \
  }                                                                                           \
  extern "C" __global__ void ce_exp_shifted_##S(T* logits, const float* st, uint32_t n,       \
                                                uint32_t c) {                                 \
    ce_exp_shifted<T>(logits, st, n, c);                                                      \
  }
PEFT_INSTANTIATE(CROSS_ENTROPY)
