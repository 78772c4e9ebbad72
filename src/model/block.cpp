#include "model/block.h"

#include <torch/nn/modules/activation.h>

namespace microdit {

static torch::nn::Sequential ada_ln(int64_t cond_dim, int64_t out) {
  return torch::nn::Sequential(torch::nn::GELU(torch::nn::GELUOptions().approximate("tanh")),
                               make_linear(cond_dim, out, /*bias=*/true));
}

DiTBlockImpl::DiTBlockImpl(const BlockSpec& s, int64_t cond_dim, const ModelConfig& cfg)
    : spec(s) {
  const double eps = cfg.norm_eps;
  norm1 = register_module("norm1", LayerNorm(s.dim, eps));
  attn = register_module("attn", SelfAttention(s.dim, s.attn_dim, s.heads, cfg.use_bias, eps));
  // Cross-attention width is never compressed: h = d.
  cross_attn = register_module(
      "cross_attn", CrossAttention(s.dim, s.dim, s.dim / cfg.head_dim, cfg.use_bias, eps));
  norm2 = register_module("norm2", LayerNorm(s.dim, eps));
  norm3 = register_module("norm3", LayerNorm(s.dim, eps));
  if (s.moe)
    mlp_moe = register_module("mlp", FeedForwardECMoE(s.dim, s.ffn_hidden, cfg.num_experts,
                                                      cfg.expert_capacity));
  else
    mlp_dense = register_module("mlp", FeedForward(s.dim, s.ffn_hidden, cfg.use_bias));
  adaLN_modulation = register_module("adaLN_modulation", ada_ln(cond_dim, 6 * s.dim));
}

// The modulation m (B, n*d) as n contiguous (B, d) tensors, in one copy: the fused kernels
// take each shift, scale and gate contiguous, and chunk's views (row stride n*d) cost them a
// copy each (4 or 6 per block, forward and backward: about 500 small kernels per XL step).
std::vector<Tensor> modulation_chunks(const Tensor& m, int64_t n) {
  const int64_t B = m.size(0), d = m.size(1) / n;
  return m.view({B, n, d}).transpose(0, 1).contiguous().unbind(0);  // n x (B, d)
}

Tensor DiTBlockImpl::forward(const Tensor& x_in, const CaptionKV& caption, const Tensor& c) {
  return forward_modulated(x_in, caption, modulation_chunks(adaLN_modulation->forward(c), 6));  // 6 x (B, d)
}

Tensor DiTBlockImpl::forward_modulated(const Tensor& x_in, const CaptionKV& caption, const std::vector<Tensor>& mod) {
  // Each norm hands the residual stream on (forward_residual), so that its backward pass adds
  // the stream's gradient in its own kernel; norm2 and norm3 take the residual sum before them
  // (forward_after_add), which sampling computes in the norm's pass.
  auto [x1, h1] = norm1->forward_residual(x_in, mod[0], mod[1]);
  auto [x2, h2] = norm2->forward_after_add(x1, mod[2], attn(h1));  // x1 + gate_msa attn, LN2
  auto [x3, h3] = norm3->forward_after_add(x2, Tensor(), cross_attn(h2, caption), mod[3], mod[4]);
  return gated_residual(x3, mod[5], spec.moe ? mlp_moe(h3) : mlp_dense(h3));
}

CaptionRefinerImpl::CaptionRefinerImpl(const ModelConfig& cfg) {
  const int64_t D = cfg.dim;
  norm1 = register_module("norm1", LayerNorm(D, cfg.norm_eps));
  attn = register_module("attn",
                         SelfAttention(D, D, D / cfg.head_dim, cfg.use_bias, cfg.norm_eps));
  norm2 = register_module("norm2", LayerNorm(D, cfg.norm_eps));
  mlp = register_module(
      "mlp", FeedForward(D, swiglu_hidden(static_cast<int>(D), 4.0, cfg.multiple_of), cfg.use_bias));
}

Tensor CaptionRefinerImpl::forward(const Tensor& y_in) {
  auto y = y_in + attn(norm1(y_in));
  return y + mlp(norm2(y));
}

FinalLayerImpl::FinalLayerImpl(int64_t dim, int64_t out, double eps) {
  linear = register_module("linear", make_linear(dim, out, true));
  adaLN_modulation = register_module("adaLN_modulation", ada_ln(dim, 2 * dim));
  norm_final = register_module("norm_final", LayerNorm(dim, eps));
}

Tensor FinalLayerImpl::forward(const Tensor& x, const Tensor& c) {
  return forward_modulated(x, modulation_chunks(adaLN_modulation->forward(c), 2));  // shift, scale: 2 x (B, D)
}

Tensor FinalLayerImpl::forward_modulated(const Tensor& x, const std::vector<Tensor>& mod) {
  return linear(norm_final->forward_modulated(x, mod[0], mod[1]));
}

}  // namespace microdit
