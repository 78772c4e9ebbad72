// The AdamW step of kernels/adamw.h on the CPU, on the process's CPU workers (core/cpu_workers.h):
// every weight of the model in one pass (float32 weights with or without a bf16 copy), with the gradient
// clipping's scale and the weights' EMA on the way, so that neither takes a pass of its own over
// memory. The same update as the CUDA kernel, but in float32 arithmetic throughout (as ATen's
// CPU fused AdamW), in blocks that GCC vectorizes: compiled for AVX-512, for AVX2 with FMA and
// for baseline x86-64, the first the CPU has taken.
#include "kernels/adamw.h"
#include "kernels/cpu_math.h"

#include "core/cpu_workers.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace microdit::kernels::cpu {

namespace {

struct Coefs {
  float decay, b1, one_minus_b1, b2, one_minus_b2, eps, bc2_sqrt, step_size, coef, ema_weight;
};

constexpr int64_t kBlock = 512;

// Elements [i0, i1) of one slot; G is float or uint16_t (bf16 bits); the copy is bf16.
template <typename G>
inline __attribute__((always_inline)) void update_range(const AdamWSlot& s, const Coefs& c, int64_t i0, int64_t i1) {
  float g[kBlock], p[kBlock];
  const G* grad = static_cast<const G*>(s.grad);
  uint16_t* copy = static_cast<uint16_t*>(s.copy);
  for (int64_t b = i0; b < i1; b += kBlock) {
    const int64_t n = std::min(kBlock, i1 - b);
    for (int64_t j = 0; j < n; ++j) {
      if constexpr (std::is_same_v<G, float>) g[j] = grad[b + j] * c.coef;
      else g[j] = bf16_bits_to_float(grad[b + j]) * c.coef;
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
      for (int64_t j = 0; j < n; ++j) copy[b + j] = float_to_bf16_bits(p[j]);
    if (s.ema) {  // at::lerp's two forms (each one rounding, as its vector kernel's fused multiply-adds)
      float* __restrict e = s.ema + b;
      const float w = c.ema_weight;
      if (w < 0.5f)
        for (int64_t j = 0; j < n; ++j) e[j] = std::fma(w, p[j] - e[j], e[j]);
      else
        for (int64_t j = 0; j < n; ++j) e[j] = std::fma(-(1.f - w), p[j] - e[j], p[j]);
    }
  }
}

template <typename G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void update_avx512(
    const AdamWSlot& s, const Coefs& c, int64_t i0, int64_t i1) {
  update_range<G>(s, c, i0, i1);
}
template <typename G>
__attribute__((target("avx2,fma"))) void update_avx2(const AdamWSlot& s, const Coefs& c, int64_t i0, int64_t i1) {
  update_range<G>(s, c, i0, i1);
}
template <typename G> void update_base(const AdamWSlot& s, const Coefs& c, int64_t i0, int64_t i1) {
  update_range<G>(s, c, i0, i1);
}

Coefs coefs(const AdamWHyper& h) {
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
  c.ema_weight = static_cast<float>(h.ema_weight);
  return c;
}

}  // namespace

void adamw_step(const AdamWSlot* slots, int64_t count, DType gt, DType ct, const AdamWHyper& h) {
  if (gt != DType::bf16 && gt != DType::f32) throw std::runtime_error("AdamW: gradients must be bf16 or float32");
  for (int64_t k = 0; k < count; ++k)
    if (slots[k].copy && ct != DType::bf16) throw std::runtime_error("AdamW on the CPU: weight copies must be bf16");
  if (count <= 0) return;
  const Coefs c = coefs(h);
  using Fn = void (*)(const AdamWSlot&, const Coefs&, int64_t, int64_t);
  // The widest variant the CPU has (the fused kernels' choice, kernels/fused.h, which tests cap).
  const std::string isa = instruction_set();
  const Fn fn = gt == DType::bf16 ? (isa == "avx512" ? &update_avx512<uint16_t>
                                     : isa == "avx2" ? &update_avx2<uint16_t>
                                                     : &update_base<uint16_t>)
                                  : (isa == "avx512" ? &update_avx512<float>
                                     : isa == "avx2" ? &update_avx2<float>
                                                     : &update_base<float>);
  // All slots' elements as one range (slot k holds [first[k], first[k + 1])), split once over
  // the threads: one parallel region for the whole model, not one per weight. microdit's
  // parallel_for, as at::parallel_for runs on this thread alone in sources built without OpenMP.
  std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);
  for (int64_t k = 0; k < count; ++k) first[k + 1] = first[k] + slots[k].n;
  microdit::parallel_for(0, first.back(), 16 * kBlock, [&](int64_t i0, int64_t i1) {
    auto k = static_cast<int64_t>(std::upper_bound(first.begin(), first.end(), i0) - first.begin()) - 1;
    for (; k < count && first[k] < i1; ++k) {
      const int64_t a = std::max(i0, first[k]) - first[k], b = std::min(i1, first[k + 1]) - first[k];
      if (a < b) fn(slots[k], c, a, b);
    }
  });
}

}  // namespace microdit::kernels::cpu
