// QK-normed self- and cross-attention (reference: SelfAttention, CrossAttention in utils.py).
// LN0 (no parameters) normalises the whole h-wide q and k across all heads at once.
#pragma once
#include "model/layers.h"

#include <string>
#include <vector>

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
  // From the product p = kv_linear(cond) (B, L, 2h) = [k | v], which may be a column slice of a
  // wider product (caption_kvs).
  CaptionKV caption_kv_from_product(const Tensor& p);
  Tensor forward(const Tensor& x, const CaptionKV& kv);   // x (B, N, d) -> (B, N, d)
  int64_t h, heads;
  Linear q_linear{nullptr}, kv_linear{nullptr}, proj{nullptr};  // kv: [k | v]
  LayerNorm ln_q{nullptr}, ln_k{nullptr};
};
TORCH_MODULE(CrossAttention);

// The keys and values of several cross-attentions from one caption cond (B, L, d): one product
// with their [k | v] weights side by side, (B, L, n * 2h), instead of one per layer, so that
// under autocast cond is cast once and its gradient comes out of one product (summed inside it)
// instead of n products, casts and adds; with the fused kernels one function takes all the k
// norms and writes their gradients into one gradient of that product. Each layer keeps its own
// parameters (checkpoints, optimizer). Layers of unequal widths or norms take one product each.
std::vector<CaptionKV> caption_kvs(const std::vector<CrossAttentionImpl*>& layers, const Tensor& cond);

// Scaled dot-product attention over heads: q (B, N, H, hd), k/v (B, M, H, hd) -> (B, N, H*hd).
// On the CPU under bf16 autocast it computes in float32 (on bf16-rounded inputs) and returns
// float32, except where cpu_bf16_attention_applies: then ATen's bf16 attention, returning bf16.
Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v);
// The CPU has AMX with bf16 (Intel Xeon since Sapphire Rapids).
bool cpu_has_amx_bf16();
// Attention on the CPU under bf16 autocast (--cpu-attention): `automatic` is float32, except
// in a sampler (a SamplingScope without gradients) on a CPU with AMX; `bf16` is always ATen's
// bf16 attention (slow on the CPU but what a GPU keeps for the backward pass: `bench --memory`
// with it predicts GPU memory).
enum class CpuAttention { automatic, float32, bf16 };
void set_cpu_attention(CpuAttention mode);
CpuAttention cpu_attention();
CpuAttention parse_cpu_attention(const std::string& name);  // auto, float32 or bf16
// Whether CPU attention takes ATen's bf16 kernel now (autocast on, and the setting above).
bool cpu_bf16_attention_applies();
// Marks, on this thread, a sampler's network evaluations (edm_sample): results that no
// backward pass will recompute, so `automatic` may pick the faster attention kernel there.
struct SamplingScope {
  SamplingScope();
  ~SamplingScope();
  SamplingScope(const SamplingScope&) = delete;
  SamplingScope& operator=(const SamplingScope&) = delete;
  bool was;
};

}  // namespace microdit
