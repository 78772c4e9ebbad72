// Scalar helpers for the CPU kernels' loops (kernels/fused_cpu.cpp, kernels/attention_cpu.cpp),
// written so that GCC vectorizes the loops that call them.
#pragma once
#include <cstdint>
#include <cstring>

namespace microdit::kernels::cpu {

// bf16 as its 16 bits: the upper half of a float32.
inline __attribute__((always_inline)) float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as c10::BFloat16 and __float2bfloat16 do; NaN stays NaN.
inline __attribute__((always_inline)) uint16_t float_to_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// exp(x) as Cephes' expf computes it: x = n ln2 + r with |r| <= ln2 / 2, a degree-7
// polynomial for exp(r), 2^n from the exponent bits. Branch-free, so the loops vectorize:
// n is rounded by adding and subtracting 1.5 * 2^23, which leaves n in the low bits of t.
inline __attribute__((always_inline)) float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;  // 2^n stays a normal float; NaN stays NaN
  x = x > 88.0f ? 88.0f : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  float r = x - n * 0.693359375f;  // ln 2 in two parts, the first exact in float
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, 4);
  bits = (bits - 0x4B400000 + 127) << 23;  // n + 127, the exponent of 2^n
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace microdit::kernels::cpu
