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
  Linear qkv{nullptr}, proj{nullptr};  // d -> 3h laid out [q | k | v]; h -> d
  LayerNorm ln_q{nullptr}, ln_k{nullptr};
};
TORCH_MODULE(SelfAttention);

// A cross-attention's keys and values of the caption tokens, (B, L, heads, hd) each. They
// depend on the caption only, so a sampler computes them once for all its steps.
struct CaptionKV {
  Tensor k, v;
};

struct CrossAttentionImpl : torch::nn::Module {
  CrossAttentionImpl(int64_t d, int64_t h, int64_t heads, bool bias, double eps);
  CaptionKV caption_kv(const Tensor& cond);              // cond (B, L, d)
  Tensor forward(const Tensor& x, const CaptionKV& kv);   // x (B, N, d) -> (B, N, d)
  int64_t h, heads;
  Linear q_linear{nullptr}, kv_linear{nullptr}, proj{nullptr};  // kv: [k | v]
  LayerNorm ln_q{nullptr}, ln_k{nullptr};
};
TORCH_MODULE(CrossAttention);

// Scaled dot-product attention over heads: q (B, N, H, hd), k/v (B, M, H, hd) -> (B, N, H*hd).
Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v);

}  // namespace microdit
