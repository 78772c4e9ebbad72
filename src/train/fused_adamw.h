// One AdamW step for all parameters of a torch::optim::AdamW in a single fused kernel
// (on the CPU microdit's, kernels/adamw.h, which also takes the clipping's scale and the EMA;
// on CUDA ATen's _fused_adamw_, and microdit's for weights with bf16 copies) instead of ~8 small
// operations per tensor. The
// moments live in the optimizer's own AdamWParamState, so checkpoints, resume and the plain
// `opt.step()` keep working and the two can be mixed. Same update as torch::optim::AdamW
// (decoupled weight decay, bias correction), up to float rounding (tests/test_fused_adamw.cpp).
#pragma once
#include <torch/optim/adamw.h>

#include <unordered_map>

namespace microdit {

class Bf16Weights;

// For a step recorded into a CUDA graph (train/cuda_graph.h): the step count and the learning
// rate come from device tensors, since a replay re-runs kernels, not host code. `step` is
// float32 () on the parameters' device and is incremented on the device (once per call, for
// every parameter: all must have taken the same number of steps); `lr` is float32 () there
// and is read by the kernel (fill it before each replay). The optimizer's host-side step
// counts advance only when the host code runs: after replays, set them with
// `set_adamw_step_counts`.
struct AdamWDeviceScalars {
  at::Tensor step;
  at::Tensor lr;
};

// The weights' exponential moving average, updated by the AdamW pass on the CPU from each
// weight's new value: shadow = lerp(shadow, weight, weight_step) (at::lerp's arithmetic), which
// with weight_step 1 is a copy. Saves the EMA's own pass over the weights.
struct FusedEma {
  std::unordered_map<const c10::TensorImpl*, at::Tensor> shadow;  // float32, contiguous, by weight
  double weight_step = 1;
};

// Parameters must be float32 on one device; amsgrad is not supported (never used here).
// With `dev`, every param group uses dev->lr (one learning rate for the whole model).
// With `copies` (train/bf16_weights.h), the weights that have a bf16 copy take their gradient
// from the copy (bf16) where it has one, else from their own .grad (float32), are updated by
// the mixed-precision kernel (kernels/adamw.h), which also writes the copies; `grad_coef`, when
// defined (a float32 () tensor on the device, from clip_grad_norm), scales those gradients
// first. On the CPU every weight takes microdit's kernel, grad_coef scales every gradient, and
// `ema` (CPU only) is updated in the same pass; on CUDA the other weights take ATen's kernel.
void fused_adamw_step(torch::optim::AdamW& opt, AdamWDeviceScalars* dev = nullptr, Bf16Weights* copies = nullptr,
                      const at::Tensor& grad_coef = {}, const FusedEma* ema = nullptr);

// Sets every parameter's AdamW step count (creating zero moments where there are none yet).
void set_adamw_step_counts(torch::optim::AdamW& opt, int64_t step);

}  // namespace microdit
