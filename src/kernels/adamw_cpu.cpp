// The mixed-precision AdamW step of kernels/adamw.h on the CPU, on LibTorch's intra-op
// threads. The same update as the CUDA kernel, but in float32 arithmetic throughout (as ATen's
// CPU fused AdamW), in blocks that GCC vectorizes: compiled for AVX-512 and for baseline
// x86-64, the first taken where the CPU has it.
#include "kernels/adamw.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace microdit::kernels::cpu {

namespace {

struct Coefs {
  float decay, b1, one_minus_b1, b2, one_minus_b2, eps, bc2_sqrt, step_size, coef;
};

inline float bf16_to_f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as c10::BFloat16; NaN stays NaN.
inline uint16_t f_to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

constexpr int64_t kBlock = 512;

// Elements [i0, i1) of one slot; G is float or uint16_t (bf16 bits); the copy is bf16.
template <typename G>
inline void update_range(const AdamWSlot& s, const Coefs& c, int64_t i0, int64_t i1) {
  float g[kBlock], p[kBlock];
  const G* grad = static_cast<const G*>(s.grad);
  uint16_t* copy = static_cast<uint16_t*>(s.copy);
  for (int64_t b = i0; b < i1; b += kBlock) {
    const int64_t n = std::min(kBlock, i1 - b);
    for (int64_t j = 0; j < n; ++j) {
      if constexpr (std::is_same_v<G, float>) g[j] = grad[b + j] * c.coef;
      else g[j] = bf16_to_f(grad[b + j]) * c.coef;
    }
    float* __restrict param = s.param + b;
    float* __restrict m = s.exp_avg + b;
    float* __restrict v = s.exp_avg_sq + b;
    const float decay = c.decay, b1 = c.b1, b1c = c.one_minus_b1, b2 = c.b2, b2c = c.one_minus_b2;
    const float eps = c.eps, bc2_sqrt = c.bc2_sqrt, step_size = c.step_size;
    for (int64_t j = 0; j < n; ++j) {
      float x = param[j] - decay * param[j];
      const float mj = b1 * m[j] + b1c * g[j];
      const float vj = b2 * v[j] + b2c * g[j] * g[j];
      x -= step_size * mj / (std::sqrt(vj) / bc2_sqrt + eps);
      param[j] = x;
      m[j] = mj;
      v[j] = vj;
      p[j] = x;
    }
    if (copy)
      for (int64_t j = 0; j < n; ++j) copy[b + j] = f_to_bf16(p[j]);
  }
}

template <typename G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void update_avx512(
    const AdamWSlot& s, const Coefs& c, int64_t i0, int64_t i1) {
  update_range<G>(s, c, i0, i1);
}
template <typename G> void update_base(const AdamWSlot& s, const Coefs& c, int64_t i0, int64_t i1) {
  update_range<G>(s, c, i0, i1);
}

bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return yes;
}

template <typename G> void update(const AdamWSlot& s, const AdamWHyper& h) {
  const double lr = h.lr_dev ? static_cast<double>(*h.lr_dev) : h.lr;
  const double step = h.step_dev ? static_cast<double>(*h.step_dev) : h.step;
  const float bc1 = static_cast<float>(1 - std::pow(h.beta1, step));
  Coefs c;
  c.decay = static_cast<float>(lr * h.weight_decay);
  c.b1 = static_cast<float>(h.beta1);
  c.one_minus_b1 = static_cast<float>(1 - h.beta1);
  c.b2 = static_cast<float>(h.beta2);
  c.one_minus_b2 = static_cast<float>(1 - h.beta2);
  c.eps = static_cast<float>(h.eps);
  c.bc2_sqrt = std::sqrt(static_cast<float>(1 - std::pow(h.beta2, step)));
  c.step_size = static_cast<float>(lr / bc1);
  c.coef = h.grad_coef ? *h.grad_coef : 1.f;
  auto* fn = has_avx512() ? &update_avx512<G> : &update_base<G>;
  at::parallel_for(0, s.n, 16 * kBlock, [&](int64_t i0, int64_t i1) { fn(s, c, i0, i1); });
}

}  // namespace

void adamw_step(const AdamWSlot* slots, int64_t count, DType gt, DType ct, const AdamWHyper& h) {
  if (ct != DType::bf16) throw std::runtime_error("AdamW on the CPU: weight copies must be bf16");
  for (int64_t k = 0; k < count; ++k) {
    if (gt == DType::bf16) update<uint16_t>(slots[k], h);
    else if (gt == DType::f32) update<float>(slots[k], h);
    else throw std::runtime_error("AdamW: gradients must be bf16 or float32");
  }
}

}  // namespace microdit::kernels::cpu
