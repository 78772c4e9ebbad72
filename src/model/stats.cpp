#include "model/stats.h"

#include <algorithm>

namespace microdit {

namespace {

// Parameters of one DiT block of width d conditioned on D.
struct BlockCost {
  int64_t params = 0, expert_params = 0;
  double macs = 0;  // multiply-adds for N tokens and L caption tokens
};

BlockCost block_cost(const BlockSpec& s, const ModelConfig& c, int64_t N, int64_t L) {
  const int64_t d = s.dim, h = s.attn_dim, n = s.ffn_hidden, D = c.dim, E = c.num_experts;
  const int64_t b = c.use_bias ? 1 : 0;
  BlockCost r;
  r.params += 3 * d;                                   // norm1..3
  r.params += 3 * h * d + 3 * h * b + h * d + d * b;   // attn.qkv, attn.proj
  r.params += d * d + d * b + 2 * d * d + 2 * d * b + d * d + d * b;  // cross_attn
  r.params += D * 6 * d + 6 * d;                       // adaLN_modulation.1
  r.macs += N * (3.0 * h * d + h * d) + 2.0 * N * N * h;           // self-attention
  r.macs += N * 2.0 * d * d + L * 2.0 * d * d + 2.0 * N * L * d;   // cross-attention
  r.macs += 6.0 * d * D;                                           // modulation (per image)
  if (s.moe) {
    r.expert_params = 2 * E * d * n;
    r.params += r.expert_params + E * d;  // w1, w2, gate
    const int64_t k = expert_tokens(c.expert_capacity, static_cast<int>(N), static_cast<int>(E));
    r.macs += N * d * E + E * k * 2.0 * d * n;
  } else {
    r.params += 3 * n * d + 2 * n * b + d * b;  // w1, w2, w3
    r.macs += N * 3.0 * n * d;
  }
  return r;
}

}  // namespace

ModelStats model_stats(const ModelConfig& c, double mask_ratio, int caption_len) {
  ModelStats st;
  const int64_t D = c.dim, Dm = c.patch_mixer_dim, C = c.in_channels, p = c.patch_size;
  const int64_t T = c.num_tokens(), K = c.kept_tokens(mask_ratio), L = caption_len;
  const int64_t Cc = c.caption_channels, b = c.use_bias ? 1 : 0, P = c.patch_dim();
  st.tokens = static_cast<int>(T);
  st.kept_tokens = static_cast<int>(K);
  int64_t params = 0;
  double macs = 0;

  params += D * C * p * p + D;                   // x_embedder
  macs += double(T) * C * p * p * D;
  params += 512 * D + D + D * D + D;             // t_embedder
  macs += 512.0 * D + double(D) * D;
  params += Cc * D + D + D + D * D + D;          // y_embedder (fc1, norm, fc2)
  macs += double(L) * (Cc * D + D * D);
  const int64_t nr = swiglu_hidden(static_cast<int>(D), 4.0, c.multiple_of);  // caption refiner
  params += 2 * D + 3 * D * D + 3 * D * b + D * D + D * b + 3 * nr * D + 2 * nr * b + D * b;
  macs += double(L) * (4.0 * D * D + 3.0 * nr * D) + 2.0 * L * L * D;
  params += 2 * D * D + 3 * D;                   // pooled_y_emb_process
  macs += 2.0 * D * D;
  if (Dm != D) {                                 // mixer in/out/caption maps
    params += D + D * Dm + Dm * b + Dm + Dm * D + D * b + D + D * Dm + Dm * b;
    macs += double(T) * D * Dm + double(K) * Dm * D + double(L) * D * Dm;
  }
  int64_t experts = 0;
  double expert_active = 0;
  auto add_blocks = [&](const std::vector<BlockSpec>& specs, int64_t N) {
    for (const auto& s : specs) {
      auto r = block_cost(s, c, N, L);
      params += r.params;
      macs += r.macs;
      experts += r.expert_params;
      expert_active += r.expert_params * std::min(1.0, c.expert_capacity / c.num_experts);
    }
  };
  add_blocks(mixer_blocks(c), T);
  add_blocks(backbone_blocks(c), K);
  params += D + D * P + P + D * 2 * D + 2 * D;  // final layer
  macs += double(K) * D * P + 2.0 * D * D;

  st.params = params;
  st.moe_expert_params = experts;
  st.active_params = double(params - experts) + expert_active;
  st.forward_flops = 2.0 * macs;
  st.train_flops = 3.0 * st.forward_flops;
  return st;
}

}  // namespace microdit
