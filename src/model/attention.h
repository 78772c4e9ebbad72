// QK-normed self- and cross-attention (reference: SelfAttention, CrossAttention in utils.py).
// LN0 (no parameters) normalises the whole h-wide q and k across all heads at once.
#pragma once
#include "model/layers.h"

namespace microdit {

struct SelfAttentionImpl : torch::nn::Module {
  // d: block width; h: attention width (heads * head_dim).
  SelfAttentionImpl(int64_t d, int64_t h, int64_t heads, bool bias, double eps);
  Tensor forward(const Tensor& x);  // (B, N, d) -> (B, N, d)
  int64_t h, heads;
  torch::nn::Linear qkv{nullptr}, proj{nullptr};  // d -> 3h laid out [q | k | v]; h -> d
  LayerNorm ln_q{nullptr}, ln_k{nullptr};
};
TORCH_MODULE(SelfAttention);

struct CrossAttentionImpl : torch::nn::Module {
  CrossAttentionImpl(int64_t d, int64_t h, int64_t heads, bool bias, double eps);
  Tensor forward(const Tensor& x, const Tensor& cond);  // x (B, N, d), cond (B, L, d)
  int64_t h, heads;
  torch::nn::Linear q_linear{nullptr}, kv_linear{nullptr}, proj{nullptr};  // kv: [k | v]
  LayerNorm ln_q{nullptr}, ln_k{nullptr};
};
TORCH_MODULE(CrossAttention);

// Scaled dot-product attention over heads: q (B, N, H, hd), k/v (B, M, H, hd) -> (B, N, H*hd).
Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v);

}  // namespace microdit
