// Small building blocks of MicroDiT (reference: micro_diffusion/models/utils.py).
// Registered names match the reference's state dict.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include "core/linear.h"

namespace microdit {

using torch::Tensor;

// LayerNorm with eps and no bias. affine=true: learnable `weight` ("LN");
// affine=false: no parameters at all ("LN0", used on q and k).
struct LayerNormImpl : torch::nn::Module {
  LayerNormImpl(int64_t dim, double eps, bool affine = true);
  Tensor forward(const Tensor& x);
  int64_t dim;
  double eps;
  Tensor weight;  // (dim,) or undefined
  // Under autocast: normalise in the autocast dtype (bf16) instead of float32, as Composer's
  // low_precision_layernorm algorithm does in the reference's training configs. Less memory
  // traffic, no cast before the next matmul. No effect without autocast (parity runs fp32).
  bool low_precision = false;
  // LN(x) * (1 + scale[b]) + shift[b] for x (B, T, d), shift and scale (B, d): one fused
  // kernel when fused_kernels_enabled() (model/fused.h), else modulate(forward(x), ...).
  Tensor forward_modulated(const Tensor& x, const Tensor& shift, const Tensor& scale);
  // (x, forward_modulated(x, shift, scale)) for a residual block, or (x, forward(x)) without
  // shift and scale: x handed on for the residual stream. With the fused kernels and gradients,
  // the norm's backward pass then also adds the residual stream's gradient of x (one pass
  // instead of a separate sum; model/fused.h). The same values either way.
  std::pair<Tensor, Tensor> forward_residual(const Tensor& x, const Tensor& shift = {}, const Tensor& scale = {});
  // forward_residual of the residual sum s = x + gate[b] * h (x + h when gate is undefined),
  // gate (B, d): (s, norm of s). When nothing records gradients, one fused pass computes both
  // where it applies (model/fused.h: fused_residual_norm), and a handed-over h (a temporary,
  // or std::move) receives s; the same values either way.
  std::pair<Tensor, Tensor> forward_after_add(const Tensor& x, const Tensor& gate, Tensor h,
                                              const Tensor& shift = {}, const Tensor& scale = {});
  // forward(x) written over x when nothing records gradients and the fused kernel applies
  // (model/fused.h: fused_norm_in_place), else forward(x). x must be a temporary the caller
  // owns, or a column slice of one.
  Tensor forward_in_place(const Tensor& x);
  // The fused kernels' result and saved dtypes for x (model/fused.h).
  std::pair<at::ScalarType, at::ScalarType> fused_dtypes(const Tensor& x) const;

 private:
  Tensor forward_fused(const Tensor& x, const Tensor& shift, const Tensor& scale);
  bool sampling_float32(const Tensor& x) const;
};
TORCH_MODULE(LayerNorm);

// Sets LayerNormImpl::low_precision on every LayerNorm in `m`.
void set_low_precision_layernorm(torch::nn::Module& m, bool on);

Linear make_linear(int64_t in, int64_t out, bool bias);

// timm-style Mlp without dropout: fc1 -> GELU-tanh -> norm -> fc2 (norm after the activation).
struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t in, int64_t hidden, int64_t out, double eps);
  Tensor forward(const Tensor& x);
  Linear fc1{nullptr}, fc2{nullptr};
  LayerNorm norm{nullptr};
};
TORCH_MODULE(Mlp);

// Conv2d(C, D, p, stride p) -> (B, T, D), tokens row-major over (h, w). Training on the CPU takes
// the same weights as a product over the patches (layers.cpp says why).
struct PatchEmbedImpl : torch::nn::Module {
  PatchEmbedImpl(int64_t in_channels, int64_t dim, int64_t patch);
  Tensor forward(const Tensor& x);  // (B, C, H, W) -> (B, T, D)
  torch::nn::Conv2d proj{nullptr};
};
TORCH_MODULE(PatchEmbed);

// 512-wide cos/sin features of the scalar noise input, then Linear -> GELU-tanh -> Linear.
struct TimestepEmbedderImpl : torch::nn::Module {
  static constexpr int64_t kFrequencies = 512;
  explicit TimestepEmbedderImpl(int64_t dim);
  Tensor forward(const Tensor& t);  // (B,) -> (B, D)
  torch::nn::Sequential mlp{nullptr};
};
TORCH_MODULE(TimestepEmbedder);

// [cos(t*freq), sin(t*freq)], freq_j = exp(-ln(10000) j / (dim/2)); t (B,) -> (B, dim), float32.
Tensor timestep_features(const Tensor& t, int64_t dim = TimestepEmbedderImpl::kFrequencies);

// 2D sin-cos table (grid*grid, dim) in float32: first dim/2 channels encode the column,
// the last dim/2 the row; coordinates arange(grid) / (grid / base) / interp_scale.
Tensor sincos_pos_embed_2d(int64_t dim, int64_t grid, int64_t base, double interp_scale);

// x * (1 + scale) + shift with per-sample (B, d) shift/scale broadcast over tokens.
inline Tensor modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1);
}

// The process-wide switch for the fused kernels (on by default; `--fused-kernels off`).
// They apply to float32 and bf16 CPU tensors, and to CUDA tensors where the CUDA kernels
// were compiled in.
void set_fused_kernels(bool on);
bool fused_kernels_enabled();

// x + gate[b] * h for the residual stream x (B, T, d), gate (B, d), h (B, T, d): one fused
// kernel when the fused kernels are on.
// A handed-over h (a temporary, or std::move) may receive the sum (model/fused.h).
Tensor gated_residual(const Tensor& x, const Tensor& gate, Tensor h);

}  // namespace microdit
