// Autograd functions over the fused CUDA kernels (kernels/fused.h): what LibTorch runs as a
// chain of memory-bound kernels around every matmul of a block, in one pass each way.
// The model calls them on CUDA tensors when its `fused_kernels` switch is on (the default;
// model/layers.h) and takes LibTorch's operators otherwise; tests/test_fused.cpp holds the two
// against each other.
#pragma once
#include <torch/types.h>

namespace microdit {

using torch::Tensor;

// True when the kernels are compiled in and `x` is a CUDA tensor they take (float32, bf16, f16).
bool fused_kernels_apply(const Tensor& x);

// LayerNorm over the last dimension, times `weight` (d) when defined, then, when shift and scale
// (B, d) are defined, * (1 + scale[b]) + shift[b] for x (B, T, d). Without them x may have any
// shape (..., d). The result is in `out`; the statistics are taken over x rounded to `save`,
// and that rounded x is what the backward pass keeps (x itself when `save` is x's dtype).
Tensor fused_modulated_layer_norm(const Tensor& x, const Tensor& weight, const Tensor& shift,
                                  const Tensor& scale, double eps, at::ScalarType out,
                                  at::ScalarType save);

// x + gate[b] * h: x (B, T, d) (the residual stream, and the result's dtype), gate (B, d),
// h (B, T, d).
Tensor fused_gated_residual(const Tensor& x, const Tensor& gate, const Tensor& h);

}  // namespace microdit
