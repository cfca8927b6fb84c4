// Helpers shared by the kernel sources: bf16 <-> float32 conversions (round to nearest even).
#pragma once

#include <cstdint>
#include <cstring>

namespace surge {

using bf16 = uint16_t;

inline float load(float x) { return x; }
inline float load(bf16 x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class T>
inline T store(float f);
template <>
inline float store<float>(float f) {
  return f;
}
template <>
inline bf16 store<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return bf16(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

}  // namespace surge
