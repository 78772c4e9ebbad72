// OpenCLIP's text transformer (open_clip TextTransformer / the text half of CLIP): token +
// positional embedding, pre-LN residual attention blocks under a causal mask, final LayerNorm.
// The output is the final LayerNorm over every position, (B, context_length, width), with no
// pooling or projection (what the paper conditions on). Registered names match open_clip's
// state dict ("token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight", ...).
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "core/linear.h"
#include "io/safetensors.h"

namespace microdit::text {

using torch::Tensor;

struct ClipTextConfig {
  int64_t context_length = 77, vocab_size = 49408, width = 1024, heads = 16, layers = 24;
  double mlp_ratio = 4.0, eps = 1e-5;
  bool quick_gelu = false;  // OpenAI and DFN5B towers use x * sigmoid(1.702 x)
  void validate() const;
  std::string summary() const;
};
ClipTextConfig clip_vit_h_14();  // 1024 wide, 24 layers, 16 heads, 77 tokens

struct ClipMlpImpl : torch::nn::Module {
  ClipMlpImpl(int64_t width, int64_t hidden, bool quick_gelu);
  Tensor forward(const Tensor& x);
  bool quick_gelu;
  Linear c_fc{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(ClipMlp);

// torch.nn.MultiheadAttention's parameters: in_proj_weight (3W, W) = [q; k; v], in_proj_bias,
// out_proj.{weight,bias}.
struct ClipAttentionImpl : torch::nn::Module {
  ClipAttentionImpl(int64_t width, int64_t heads);
  Tensor forward(const Tensor& x);  // (B, L, W), causal
  int64_t heads;
  Tensor in_proj_weight, in_proj_bias;
  Linear out_proj{nullptr};
};
TORCH_MODULE(ClipAttention);

struct ResidualAttentionBlockImpl : torch::nn::Module {
  explicit ResidualAttentionBlockImpl(const ClipTextConfig& c);
  Tensor forward(const Tensor& x);  // x + attn(ln_1(x)), then + mlp(ln_2(x))
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  ClipAttention attn{nullptr};
  ClipMlp mlp{nullptr};
};
TORCH_MODULE(ResidualAttentionBlock);

struct ClipTextModelImpl : torch::nn::Module {
  explicit ClipTextModelImpl(const ClipTextConfig& c);
  // (B, L <= context_length) int64 -> (B, L, W). skip_last > 0 leaves out the last blocks
  // before ln_final (Stable Diffusion 2.x conditions on the penultimate block: skip_last = 1).
  Tensor forward(const Tensor& ids, int64_t skip_last = 0);
  ClipTextConfig config;
  torch::nn::Embedding token_embedding{nullptr};
  Tensor positional_embedding;  // (context_length, W)
  std::shared_ptr<torch::nn::Module> transformer;  // holds resblocks
  torch::nn::ModuleList resblocks{nullptr};
  torch::nn::LayerNorm ln_final{nullptr};
};
TORCH_MODULE(ClipTextModel);

// The text tower's tensors from a checkpoint with open_clip names (a full CLIP state dict:
// visual.*, text_projection, logit_scale are dropped; a "text." prefix of CustomTextCLIP is
// stripped) or Hugging Face CLIPTextModel names (text_model.*: q/k/v joined into in_proj).
NamedTensors clip_text_state_dict(const NamedTensors& tensors);
// Width, layers, context and vocabulary from the tensor shapes; heads = width / 64 as in
// every open_clip text config.
ClipTextConfig clip_config_from_tensors(const NamedTensors& text_tensors);

}  // namespace microdit::text
