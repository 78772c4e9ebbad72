// The MicroDiT network (reference: DiT in micro_diffusion/models/dit.py).
//
//   x (B,C,H,W) -> patch embed + sin-cos positions -> (B,T,D)
//   t (B,) -> timestep embedder -> (B,D);  y (B,1,L,Cc) -> projection -> refiner -> (B,L,D)
//   c = t_emb + pooled caption                                            (B,D)
//   patch-mixer: map_xin -> Dm-wide DiT blocks on all T tokens (caption via map_y)
//   deferred masking: keep K = int(T(1-r)) tokens, then map_xout -> D
//   backbone: D-wide DiT blocks (layer-wise scaled, MoE in alternate blocks) on K tokens
//   final layer -> (B,K,p*p*C) -> unmask with mask_token -> unpatchify -> (B,C,H,W)
#pragma once
#include <torch/nn/modules/container/modulelist.h>

#include <memory>
#include <mutex>

#include "model/block.h"
#include "model/masking.h"

namespace microdit {

struct CaptionProjectionImpl : torch::nn::Module {
  CaptionProjectionImpl(int64_t in, int64_t dim, double eps);
  Tensor forward(const Tensor& y) { return y_proj(y); }
  Mlp y_proj{nullptr};
};
TORCH_MODULE(CaptionProjection);

// Everything a forward pass computes from the caption alone: the same at every step of a
// sampler, so `edm_sample` encodes it once instead of 2 x steps - 1 times.
struct CaptionContext {
  Tensor y;                                  // (B, L, D) projected and refined caption tokens
  Tensor pooled;                             // (B, D) the pooled caption's share of c
  std::vector<CaptionKV> mixer_kv, block_kv;  // per block: cross-attention K, V (B, L, heads, hd)
  int64_t batch() const { return y.size(0); }
};

struct MicroDiTImpl : torch::nn::Module {
  explicit MicroDiTImpl(const ModelConfig& cfg);

  // F(x, t, y). t: (B,) or (1,) network noise input (c_noise); y: (B,1,L,Cc) or (B,L,Cc).
  // With a mask, only its kept tokens pass the backbone and removed ones hold mask_token.
  Tensor forward(const Tensor& x, const Tensor& t, const Tensor& y,
                 const TokenMask* mask = nullptr) {
    check_inputs(x, t, y);
    return forward(x, t, encode_caption(y), mask);
  }
  // The same from an encoded caption (batch B).
  Tensor forward(const Tensor& x, const Tensor& t, const CaptionContext& caption,
                 const TokenMask* mask = nullptr);
  // y (B,1,L,Cc) or (B,L,Cc) -> its CaptionContext; with_null: of [y; zeros] (batch 2B),
  // what forward_cfg takes.
  CaptionContext encode_caption(const Tensor& y, bool with_null = false);
  // Classifier-free guidance: one pass on [y; zeros], F_u + w (F_c - F_u).
  Tensor forward_cfg(const Tensor& x, const Tensor& t, const Tensor& y, double cfg) {
    check_inputs(x, t, y);
    return forward_cfg(x, t, encode_caption(y, /*with_null=*/true), cfg);
  }
  Tensor forward_cfg(const Tensor& x, const Tensor& t, const CaptionContext& caption_and_null, double cfg);

  // The reference's initialisation (xavier linears, zeroed adaLN and output layers).
  void initialize_weights();
  // Rebuild pos_embed for a new latent size (stage change, e.g. 32 -> 64 with scale 2).
  void set_resolution(int input_size, double pos_interp_scale);

  const ModelConfig& config() const { return cfg; }
  // Activation checkpointing (model/recompute.h): when set and gradients are on, every block
  // keeps only its inputs and runs again in the backward pass.
  bool recompute_blocks = false;
  // One-line errors for inputs of the wrong shape (forward calls it).
  void check_inputs(const Tensor& x, const Tensor& t, const Tensor& y) const;

  ModelConfig cfg;
  PatchEmbed x_embedder{nullptr};
  TimestepEmbedder t_embedder{nullptr};
  CaptionProjection y_embedder{nullptr};
  CaptionRefiner y_emb_preprocess{nullptr};
  Mlp pooled_y_emb_process{nullptr};
  torch::nn::ModuleList patch_mixer{nullptr}, blocks{nullptr};
  // LN -> Linear maps between widths D and Dm; null (identity) when Dm == D.
  torch::nn::Sequential patch_mixer_map_xin{nullptr}, patch_mixer_map_xout{nullptr},
      patch_mixer_map_y{nullptr};
  FinalLayer final_layer{nullptr};
  Tensor pos_embed;   // buffer (1, T, D)
  Tensor mask_token;  // buffer (1, 1, p*p*C)

 private:
  // Without gradients: the modulations of every block and of the final layer from one product
  // of GELU-tanh(c) (B, D) with all their adaLN weights, concatenated once and kept until a
  // weight changes. Returns per block (mixer blocks, backbone blocks, final layer) its parts.
  // Thread-safe: a sampler's CPU workers run chunks through one model side by side.
  std::vector<std::vector<Tensor>> modulations(const Tensor& c);
  struct AdaLNWeights {
    std::mutex mutex;
    Tensor w, b;  // (sum of outputs, D), (sum of outputs)
    std::vector<std::pair<const void*, uint32_t>> key;  // each weight and bias: data, version
  };
  std::shared_ptr<AdaLNWeights> adaln_ = std::make_shared<AdaLNWeights>();
  void check_image(const Tensor& x, const Tensor& t) const;
  Tensor unpatchify(const Tensor& x) const;  // (B, T, p*p*C) -> (B, C, H, W)
};
TORCH_MODULE(MicroDiT);

}  // namespace microdit
