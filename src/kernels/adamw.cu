// The mixed-precision AdamW step of kernels/adamw.h on CUDA.
#include "kernels/adamw.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace microdit::kernels {

namespace {

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half(v); }

// Kernel arguments hold the slots of one launch (by value: a CUDA graph keeps them).
constexpr int kSlotsPerLaunch = 32;
struct Launch {
  AdamWSlot slot[kSlotsPerLaunch];
};

// Four consecutive elements in one 16-byte (float32) or 8-byte (16-bit) access.
template <typename T> struct alignas(sizeof(T) * 4) Vec4 {
  T v[4];
};

__device__ __forceinline__ bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The update of one element: the arithmetic of ATen's fused AdamW, the hyper-parameters in
// float64 (so that, as there, the weight decay and the moments are taken in float64 and rounded
// to float32 on assignment).
struct Update {
  double lr, beta1, beta2, eps, wd;
  float step_size, bc2_sqrt, coef;
  bool scaled;
  __device__ __forceinline__ void operator()(float& p, float& m, float& v, float g) const {
    if (scaled) g *= coef;
    p -= lr * wd * p;
    m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * g * g;
    const float denom = (std::sqrt(v) / bc2_sqrt) + eps;
    p -= step_size * m / denom;
  }
};

// blockIdx.y picks the slot; the blocks along x stride over its elements, four at a time where
// every pointer of the slot allows, then the remaining elements one by one.
template <typename G, typename C>
__global__ void adamw_kernel(Launch args, AdamWHyper h) {
  const AdamWSlot s = args.slot[blockIdx.y];
  const double lr = h.lr_dev ? static_cast<double>(*h.lr_dev) : h.lr;
  const double step = h.step_dev ? static_cast<double>(*h.step_dev) : h.step;
  // As ATen's fused AdamW: the corrections in float32 from float64 powers.
  const float bc1 = static_cast<float>(1 - std::pow(h.beta1, step));
  Update up;
  up.lr = lr;
  up.beta1 = h.beta1;
  up.beta2 = h.beta2;
  up.eps = h.eps;
  up.wd = h.weight_decay;
  up.bc2_sqrt = std::sqrt(static_cast<float>(1 - std::pow(h.beta2, step)));
  up.step_size = static_cast<float>(lr / bc1);
  up.scaled = h.grad_coef != nullptr;
  up.coef = h.grad_coef ? *h.grad_coef : 1.f;
  const G* grad = static_cast<const G*>(s.grad);
  C* copy = static_cast<C*>(s.copy);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool vec = aligned(s.param, 16) && aligned(s.exp_avg, 16) && aligned(s.exp_avg_sq, 16) &&
                   aligned(grad, sizeof(Vec4<G>)) && (copy == nullptr || aligned(copy, sizeof(Vec4<C>)));
  const int64_t n4 = vec ? s.n / 4 : 0;
  for (int64_t i = first; i < n4; i += stride) {
    auto p = reinterpret_cast<Vec4<float>*>(s.param)[i];
    auto m = reinterpret_cast<Vec4<float>*>(s.exp_avg)[i];
    auto v = reinterpret_cast<Vec4<float>*>(s.exp_avg_sq)[i];
    const auto g = reinterpret_cast<const Vec4<G>*>(grad)[i];
#pragma unroll
    for (int k = 0; k < 4; ++k) up(p.v[k], m.v[k], v.v[k], load_f(g.v, k));
    reinterpret_cast<Vec4<float>*>(s.param)[i] = p;
    reinterpret_cast<Vec4<float>*>(s.exp_avg)[i] = m;
    reinterpret_cast<Vec4<float>*>(s.exp_avg_sq)[i] = v;
    if (copy) {
      Vec4<C> c;
#pragma unroll
      for (int k = 0; k < 4; ++k) store(c.v, k, p.v[k]);
      reinterpret_cast<Vec4<C>*>(copy)[i] = c;
    }
  }
  for (int64_t i = n4 * 4 + first; i < s.n; i += stride) {
    float p = s.param[i], m = s.exp_avg[i], v = s.exp_avg_sq[i];
    up(p, m, v, load_f(grad, i));
    s.param[i] = p;
    s.exp_avg[i] = m;
    s.exp_avg_sq[i] = v;
    if (copy) store(copy, i, p);
  }
}

template <typename F> void with_grad_type(DType t, F&& f) {
  if (t == DType::bf16) return f(static_cast<__nv_bfloat16*>(nullptr));
  if (t == DType::f32) return f(static_cast<float*>(nullptr));
  throw std::runtime_error("AdamW: gradients must be bf16 or float32");
}
template <typename F> void with_copy_type(DType t, F&& f) {
  if (t == DType::bf16) return f(static_cast<__nv_bfloat16*>(nullptr));
  if (t == DType::f16) return f(static_cast<__half*>(nullptr));
  throw std::runtime_error("AdamW: weight copies must be bf16 or float16");
}

}  // namespace

void adamw_step(const AdamWSlot* slots, int64_t count, DType gt, DType ct, const AdamWHyper& h, void* stream) {
  constexpr int threads = 256;
  for (int64_t j = 0; j < count; ++j)
    if (slots[j].ema) throw std::runtime_error("AdamW on CUDA: the EMA takes a pass of its own (AdamWSlot::ema is CPU only)");
  with_grad_type(gt, [&](auto* gp) {
    with_copy_type(ct, [&](auto* cp) {
      using G = std::remove_pointer_t<decltype(gp)>;
      using C = std::remove_pointer_t<decltype(cp)>;
      for (int64_t first = 0; first < count; first += kSlotsPerLaunch) {
        const int64_t k = std::min<int64_t>(kSlotsPerLaunch, count - first);
        Launch args{};
        int64_t most = 1;
        for (int64_t j = 0; j < k; ++j) {
          args.slot[j] = slots[first + j];
          most = std::max(most, slots[first + j].n);
        }
        // At least 8 elements (two vectors) per thread, at most 1,024 blocks per slot.
        const int64_t blocks = std::clamp<int64_t>((most + threads * 8 - 1) / (threads * 8), 1, 1024);
        adamw_kernel<G, C><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(k)), threads, 0,
                             static_cast<cudaStream_t>(stream)>>>(args, h);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel AdamW failed: ") + cudaGetErrorString(e));
      }
    });
  });
}

}  // namespace microdit::kernels
