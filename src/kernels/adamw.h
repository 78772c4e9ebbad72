// AdamW for float32 weights whose forward pass runs on low-precision copies (train/bf16_weights.h):
// one pass per element reads the weight, its gradient (bf16 as the backward pass left it, or
// float32), the two moments, and writes the weight, the moments and the weight's bf16 copy
// for the next forward pass. LibTorch's _fused_adamw_ takes one dtype for all of them, so the
// bf16 gradients would first need a float32 copy, and the copy for the forward pass another
// cast of every weight: about 700 kernels and 7 GB of traffic per step at MicroDiT_XL_2
// (docs/performance.md). Same arithmetic as ATen's fused AdamW (CUDA): hyper-parameters in
// float64, the element values in float32; plain C++ interface as kernels/fused.h.
#pragma once
#include <cstdint>

#include "kernels/fused.h"

namespace microdit::kernels {

// One weight tensor of n elements, all contiguous.
struct AdamWSlot {
  float* param;
  const void* grad;  // gt (bf16 or float32)
  float* exp_avg;
  float* exp_avg_sq;
  void* copy;  // ct (bf16 or float16): receives param rounded to it after the update; may be null
  int64_t n;
  // CPU only (the CUDA kernel refuses it): the weight's exponential moving average, moved
  // towards the updated weight as at::lerp does: ema += ema_weight (param - ema); may be null.
  float* ema = nullptr;
};

struct AdamWHyper {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  double step = 1;                 // the step count after this step's increment (1 for the first)
  const float* lr_dev = nullptr;    // when set, lr is read from this float in the slots' memory (device
                                    // memory for the CUDA kernel, host memory for the CPU one)
  const float* step_dev = nullptr;  // likewise the step count
  const float* grad_coef = nullptr;  // when set, every gradient is multiplied by *grad_coef first
  double ema_weight = 1;             // the slots' EMA step (1: the EMA becomes a copy of the weight)
};

// grad = grad * coef;  param -= lr * wd * param;  m = b1 m + (1 - b1) grad;
// v = b2 v + (1 - b2) grad^2;  param -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps);
// copy = param (rounded);  ema = lerp(ema, param, ema_weight) (CPU).  Every slot's grad has dtype gt
// and copy dtype ct.
void adamw_step(const AdamWSlot* slots, int64_t count, DType gt, DType ct, const AdamWHyper& h, void* stream);

namespace cpu {
// All slots in one pass on LibTorch's intra-op threads; a slot's copy may be null (float32
// weights without one), ct applies to those that have one.
void adamw_step(const AdamWSlot* slots, int64_t count, DType gt, DType ct, const AdamWHyper& h);
}  // namespace cpu

}  // namespace microdit::kernels
