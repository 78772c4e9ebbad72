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
// Its constants, shared with the AVX-512 form in kernels/attention_cpu.cpp.
struct ExpPoly {
  static constexpr float lo = -87.0f, hi = 88.0f;  // clamp: 2^n stays a normal float
  static constexpr float round = 12582912.0f;       // 1.5 * 2^23
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;  // ln 2 in two parts, the first exact
  static constexpr float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  static constexpr int32_t exponent_bias = 127 - 0x4B400000;  // t's bits + this = n + 127
};

inline __attribute__((always_inline)) float exp_poly(float x) {
  using E = ExpPoly;
  x = x < E::lo ? E::lo : x;  // NaN stays NaN
  x = x > E::hi ? E::hi : x;
  const float t = x * E::log2e + E::round;
  const float n = t - E::round;
  float r = x - n * E::ln2_hi;
  r = r - n * E::ln2_lo;
  float p = E::c[0];
  for (int i = 1; i < 6; ++i) p = p * r + E::c[i];
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, 4);
  bits = (bits + E::exponent_bias) << 23;  // n + 127, the exponent of 2^n
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace microdit::kernels::cpu
