// CLIP score as torchmetrics defines it (the mean of 100 x cosine of image and caption
// embeddings, clipped at 0), with OpenCLIP's image tower beside the text tower of text/clip.h.
//
// The image tower is open_clip's VisionTransformer with its defaults (the ViT-H/14 shape of
// the paper's text encoder): conv1 patch embedding (no bias), class token, learned positional
// embedding, ln_pre, pre-LN residual attention blocks (no mask), ln_post, class-token pooling,
// proj. Names as open_clip's state dict under "visual.". The text side is the text tower,
// ln_final, the end-of-text position (argmax of the ids), then text_projection.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/normalization.h>

#include <memory>

#include "data/image.h"
#include "io/safetensors.h"
#include "text/clip.h"

namespace microdit {

using torch::Tensor;

struct ClipVisionConfig {
  int64_t image_size = 224, patch_size = 14, width = 1280, layers = 32, heads = 16, output_dim = 1024;
  double mlp_ratio = 4.0, eps = 1e-5;
  bool quick_gelu = false;
  void validate() const;
  std::string summary() const;
};
ClipVisionConfig clip_vit_h_14_vision();  // 224 px, patch 14, 1280 wide, 32 layers, 16 heads -> 1024

struct ClipVisionModelImpl : torch::nn::Module {
  explicit ClipVisionModelImpl(const ClipVisionConfig& c);
  // (B, 3, S, S) normalised pixels -> (B, output_dim), not L2-normalised.
  Tensor forward(const Tensor& pixels);
  ClipVisionConfig config;
  torch::nn::Conv2d conv1{nullptr};
  Tensor class_embedding, positional_embedding, proj;
  torch::nn::LayerNorm ln_pre{nullptr}, ln_post{nullptr};
  std::shared_ptr<torch::nn::Module> transformer;
  torch::nn::ModuleList resblocks{nullptr};
};
TORCH_MODULE(ClipVisionModel);

// "visual.*" of a full open_clip state dict, prefix stripped (an unprefixed tower is kept).
NamedTensors clip_vision_state_dict(const NamedTensors& tensors);
// Shape from the tensors; heads from open_clip's head widths (1280 -> 80, 1664 -> 104, else 64).
ClipVisionConfig clip_vision_config_from_tensors(const NamedTensors& vision);

// open_clip's image preprocessing: Resize(S, bicubic) + CenterCrop(S) on the PIL image,
// ToTensor, Normalize(OpenAI mean, std) -> (3, S, S) float32.
Tensor clip_preprocess(const Image& image, int64_t size);

// A full CLIP (image tower, text tower, text_projection) loaded from an open_clip state dict
// (.safetensors or torch.save .pth; "module."/"state_dict" nesting handled by read_checkpoint).
class ClipScorer {
 public:
  ClipScorer(const std::string& weights, c10::Device device = c10::kCPU, bool quick_gelu = false);
  // (B, 3, S, S) preprocessed -> (B, D) unit vectors (float32, CPU).
  Tensor image_features(const Tensor& pixels);
  // (B, L) token ids -> (B, D) unit vectors.
  Tensor text_features(const Tensor& ids);
  // Captions -> ids (B, context) with open_clip's tokenizer (needs the BPE vocabulary asset).
  Tensor tokenize(const std::vector<std::string>& captions);
  int64_t image_size() const { return vision_->config.image_size; }
  std::string describe() const;

  ClipVisionModel vision_{nullptr};
  text::ClipTextModel text_{nullptr};
  Tensor text_projection;  // (W_text, D)

 private:
  c10::Device device_;
  std::string source_;
};

// 100 * cos of matching rows of unit features, (B,) float64 (not clipped).
Tensor clip_scores(const Tensor& image_features, const Tensor& text_features);
// torchmetrics' CLIPScore over pairs: max(mean(100 * cos), 0).
double clip_score(const Tensor& scores);

}  // namespace microdit
