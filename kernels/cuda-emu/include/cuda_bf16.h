// Stand-in for CUDA's header in the CPU emulation: bf16 as its bits, round-to-nearest-even.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t b = (uint32_t)v.bits << 16;
  float f;
  memcpy(&f, &b, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((b >> 16) | 0x40)};  // quiet NaN
  b += 0x7fffu + ((b >> 16) & 1u);
  return {(uint16_t)(b >> 16)};
}
