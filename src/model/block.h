// Transformer blocks of MicroDiT (reference: DiTBlock, AttentionBlockPromptEmbedding,
// T2IFinalLayer).
#pragma once
#include <torch/nn/modules/container/any.h>

#include "model/attention.h"
#include "model/config.h"
#include "model/ffn.h"

namespace microdit {

// (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(D, 6d)(GELU-tanh(c))
// x += gate1 * SelfAttn(modulate(LN1 x));  x += CrossAttn(LN2 x, caption);
// x += gate2 * FFN(modulate(LN3 x)).
struct DiTBlockImpl : torch::nn::Module {
  DiTBlockImpl(const BlockSpec& spec, int64_t cond_dim, const ModelConfig& cfg);
  // x (B, N, d), c (B, D); caption: the cross-attention's keys and values of the caption
  // tokens, cross_attn->caption_kv(caption (B, L, d)).
  Tensor forward(const Tensor& x, const CaptionKV& caption, const Tensor& c);
  // The same from the modulation's six (B, d) parts, computed by the caller (MicroDiT computes
  // every block's in one product when nothing records gradients).
  Tensor forward_modulated(const Tensor& x, const CaptionKV& caption, const std::vector<Tensor>& mod);
  BlockSpec spec;
  LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  SelfAttention attn{nullptr};
  CrossAttention cross_attn{nullptr};
  FeedForward mlp_dense{nullptr};    // registered as "mlp" when !spec.moe
  FeedForwardECMoE mlp_moe{nullptr};  // registered as "mlp" when spec.moe
  torch::nn::Sequential adaLN_modulation{nullptr};
};
TORCH_MODULE(DiTBlock);

// The caption refiner: one pre-norm block on the caption tokens,
// y += Attn(LN1 y); y += SwiGLU(LN2 y) with hidden from ratio 4.
struct CaptionRefinerImpl : torch::nn::Module {
  CaptionRefinerImpl(const ModelConfig& cfg);
  Tensor forward(const Tensor& y);  // (B, L, D)
  LayerNorm norm1{nullptr}, norm2{nullptr};
  SelfAttention attn{nullptr};
  FeedForward mlp{nullptr};
};
TORCH_MODULE(CaptionRefiner);

// (shift, scale) = Linear(D, 2D)(GELU-tanh(c)); x = Linear(D, p*p*C)(modulate(LN x)).
struct FinalLayerImpl : torch::nn::Module {
  FinalLayerImpl(int64_t dim, int64_t out, double eps);
  Tensor forward(const Tensor& x, const Tensor& c);  // (B, N, D) -> (B, N, p*p*C)
  Tensor forward_modulated(const Tensor& x, const std::vector<Tensor>& mod);  // mod: shift, scale
  LayerNorm norm_final{nullptr};
  Linear linear{nullptr};
  torch::nn::Sequential adaLN_modulation{nullptr};
};
TORCH_MODULE(FinalLayer);

// The modulation m (B, n*d) as n contiguous (B, d) tensors (block.cpp has why).
std::vector<Tensor> modulation_chunks(const Tensor& m, int64_t n);

}  // namespace microdit
