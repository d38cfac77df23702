// Stand-in for CUDA's header in the CPU emulation: f16 through the compiler's _Float16.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half v) {
  _Float16 h;
  memcpy(&h, &v.bits, 2);
  return (float)h;
}

inline __half __float2half(float f) {
  const _Float16 h = (_Float16)f;
  __half v;
  memcpy(&v.bits, &h, 2);
  return v;
}
