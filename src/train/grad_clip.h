// Gradient clipping by the global L2 norm without a host synchronisation. LibTorch's
// torch::nn::utils::clip_grad_norm_ returns the norm as a host double, so every step waits for
// the GPU there; this one leaves the norm on the device (read it when it is logged) and uses
// two multi-tensor kernels instead of one per parameter.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace microdit {

class Bf16Weights;

// Scales every defined .grad by min(1, max_norm / (norm + 1e-6)), where norm is the L2 norm of
// all of them together (as torch.nn.utils.clip_grad_norm_), and returns norm: a 0-dim float32
// tensor on the gradients' device, undefined when no parameter has a gradient.
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

// The same for fused_adamw_step, which scales the gradients as it reads them: the gradients of
// the weights with a bf16 copy (train/bf16_weights.h, when `copies` is given; bf16 on the copy,
// or float32 on the weight where they were summed in float32), and on the CPU every gradient,
// enter the norm in float32 but are not scaled here; `*coef` receives the scale (0-dim float32
// on the device) for the AdamW step to apply to them (fused_adamw_step's grad_coef), which gives
// the values of scaling their float32 values in place. Other gradients (those of weights
// without a copy on CUDA) are scaled in place as above.
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, const Bf16Weights* copies,
                          at::Tensor* coef);

}  // namespace microdit
