#include "eval/clip_image.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>

#include "core/error.h"
#include "core/linear.h"
#include "data/image_io.h"
#include "io/checkpoint.h"
#include "text/bpe.h"
#include "text/encoder.h"

namespace microdit {

namespace nn = torch::nn;

void ClipVisionConfig::validate() const {
  MD_CHECK(image_size > 0 && patch_size > 0 && image_size % patch_size == 0,
           "CLIP image config: image size {} is not a multiple of the patch size {}", image_size, patch_size);
  MD_CHECK(width > 0 && layers > 0 && output_dim > 0 && heads > 0 && width % heads == 0,
           "CLIP image config: width {} not divisible by heads {}", width, heads);
}

std::string ClipVisionConfig::summary() const {
  return fmt::format("image {}, patch {}, width {}, layers {}, heads {}, output {}", image_size, patch_size, width,
                     layers, heads, output_dim);
}

ClipVisionConfig clip_vit_h_14_vision() { return ClipVisionConfig{}; }

namespace {

// nn.MultiheadAttention without a mask (names as text::ClipAttention).
struct VisionAttentionImpl : nn::Module {
  VisionAttentionImpl(int64_t width, int64_t heads) : heads(heads) {
    in_proj_weight = register_parameter("in_proj_weight", torch::randn({3 * width, width}) * 0.02);
    in_proj_bias = register_parameter("in_proj_bias", torch::zeros({3 * width}));
    out_proj = register_module("out_proj", Linear(width, width));
  }
  Tensor forward(const Tensor& x) {
    const int64_t B = x.size(0), L = x.size(1), W = x.size(2);
    auto qkv = microdit::linear(x, in_proj_weight, in_proj_bias).view({B, L, 3, heads, W / heads}).permute({2, 0, 3, 1, 4});
    auto o = at::scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]);
    return out_proj(o.transpose(1, 2).reshape({B, L, W}));
  }
  int64_t heads;
  Tensor in_proj_weight, in_proj_bias;
  Linear out_proj{nullptr};
};
TORCH_MODULE(VisionAttention);

struct VisionBlockImpl : nn::Module {
  explicit VisionBlockImpl(const ClipVisionConfig& c) {
    auto ln = [&] { return nn::LayerNorm(nn::LayerNormOptions({c.width}).eps(c.eps)); };
    ln_1 = register_module("ln_1", ln());
    attn = register_module("attn", VisionAttention(c.width, c.heads));
    ln_2 = register_module("ln_2", ln());
    mlp = register_module("mlp", text::ClipMlp(c.width, int64_t(c.width * c.mlp_ratio), c.quick_gelu));
  }
  Tensor forward(const Tensor& x) {
    auto h = x + attn(ln_1(x));
    return h + mlp(ln_2(h));
  }
  nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  VisionAttention attn{nullptr};
  text::ClipMlp mlp{nullptr};
};
TORCH_MODULE(VisionBlock);

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

const Tensor& find(const NamedTensors& t, const std::string& k, const std::string& what) {
  for (const auto& [n, v] : t)
    if (n == k) return v;
  fail("{} has no '{}'", what, k);
}

}  // namespace

ClipVisionModelImpl::ClipVisionModelImpl(const ClipVisionConfig& c) : config(c) {
  c.validate();
  const int64_t grid = c.image_size / c.patch_size;
  conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(3, c.width, c.patch_size).stride(c.patch_size).bias(false)));
  const double scale = 1.0 / std::sqrt(double(c.width));
  class_embedding = register_parameter("class_embedding", torch::randn({c.width}) * scale);
  positional_embedding = register_parameter("positional_embedding", torch::randn({grid * grid + 1, c.width}) * scale);
  ln_pre = register_module("ln_pre", nn::LayerNorm(nn::LayerNormOptions({c.width}).eps(c.eps)));
  transformer = register_module("transformer", std::make_shared<nn::Module>());
  resblocks = nn::ModuleList();
  for (int64_t i = 0; i < c.layers; ++i) resblocks->push_back(VisionBlock(c));
  transformer->register_module("resblocks", resblocks);
  ln_post = register_module("ln_post", nn::LayerNorm(nn::LayerNormOptions({c.width}).eps(c.eps)));
  proj = register_parameter("proj", torch::randn({c.width, c.output_dim}) * scale);
}

Tensor ClipVisionModelImpl::forward(const Tensor& pixels) {
  const auto S = config.image_size;
  MD_CHECK(pixels.dim() == 4 && pixels.size(1) == 3 && pixels.size(2) == S && pixels.size(3) == S,
           "CLIP image input must be (B, 3, {}, {}), got {}", S, S, pixels.sizes());
  auto x = conv1(pixels).flatten(2).transpose(1, 2);  // (B, grid^2, W)
  const int64_t B = x.size(0);
  x = at::cat({class_embedding.view({1, 1, -1}).expand({B, 1, config.width}).to(x.dtype()), x}, 1);
  x = ln_pre(x + positional_embedding.to(x.dtype()));
  for (const auto& m : *resblocks) x = m->as<VisionBlock>()->forward(x);
  x = ln_post(x);
  return at::mm(x.select(1, 0), proj);  // class token -> (B, output_dim)
}

NamedTensors clip_vision_state_dict(const NamedTensors& tensors) {
  bool prefixed = false, bare = false;
  for (const auto& [k, t] : tensors) prefixed |= starts_with(k, "visual."), bare |= k == "conv1.weight";
  if (!prefixed && !bare) return {};
  NamedTensors out;
  for (const auto& [k, t] : tensors) {
    if (prefixed && !starts_with(k, "visual.")) continue;
    const std::string n = prefixed ? k.substr(7) : k;
    if (starts_with(n, "conv1.") || n == "class_embedding" || n == "positional_embedding" || n == "proj" ||
        starts_with(n, "ln_pre.") || starts_with(n, "ln_post.") || starts_with(n, "transformer."))
      out.emplace_back(n, t);
  }
  return out;
}

ClipVisionConfig clip_vision_config_from_tensors(const NamedTensors& v) {
  const std::string what = "CLIP image tower";
  const auto& conv = find(v, "conv1.weight", what);
  const auto& pos = find(v, "positional_embedding", what);
  const auto& proj = find(v, "proj", what);
  MD_CHECK(conv.dim() == 4 && pos.dim() == 2 && proj.dim() == 2, "CLIP image tower: unexpected tensor ranks");
  ClipVisionConfig c;
  c.width = conv.size(0);
  c.patch_size = conv.size(2);
  const auto grid = int64_t(std::lround(std::sqrt(double(pos.size(0) - 1))));
  MD_CHECK(grid * grid + 1 == pos.size(0), "CLIP image tower: {} positions is not a square grid plus one", pos.size(0));
  c.image_size = grid * c.patch_size;
  c.output_dim = proj.size(1);
  c.layers = 0;
  for (const auto& [n, t] : v)
    if (starts_with(n, "transformer.resblocks.") && n.ends_with(".ln_1.weight")) ++c.layers;
  c.mlp_ratio = double(find(v, "transformer.resblocks.0.mlp.c_fc.weight", what).size(0)) / double(c.width);
  const int64_t head_width = c.width == 1280 ? 80 : c.width == 1664 ? 104 : 64;
  c.heads = std::max<int64_t>(1, c.width / head_width);
  c.validate();
  return c;
}

Tensor clip_preprocess(const Image& image, int64_t size) {
  auto x = reference_resize_crop(image, int(size));
  auto t = at::from_blob(x.pixels.data(), {size, size, 3}, at::kByte).permute({2, 0, 1}).to(at::kFloat) / 255.0f;
  const auto mean = torch::tensor({0.48145466f, 0.4578275f, 0.40821073f}).view({3, 1, 1});
  const auto std = torch::tensor({0.26862954f, 0.26130258f, 0.27577711f}).view({3, 1, 1});
  return (t - mean) / std;
}

ClipScorer::ClipScorer(const std::string& weights, c10::Device device, bool quick_gelu)
    : device_(device), source_(weights) {
  const auto all = read_checkpoint(weights, "");
  auto vis = clip_vision_state_dict(all);
  MD_CHECK(!vis.empty(), "{}: not an open_clip CLIP checkpoint (no image tower 'visual.*')", weights);
  auto vc = clip_vision_config_from_tensors(vis);
  vc.quick_gelu = quick_gelu;
  vision_ = ClipVisionModel(vc);
  load_state_dict(*vision_, vis, {}, weights);
  auto txt = text::clip_text_state_dict(all);
  MD_CHECK(!txt.empty(), "{}: not an open_clip CLIP checkpoint (no text tower)", weights);
  auto tc = text::clip_config_from_tensors(txt);
  tc.quick_gelu = quick_gelu;
  text_ = text::ClipTextModel(tc);
  load_state_dict(*text_, txt, {}, weights);
  const Tensor* tp = nullptr;
  for (const auto& [k, t] : all)
    if (k == "text_projection" || k == "text.text_projection") tp = &t;
  MD_CHECK(tp, "{}: the CLIP checkpoint has no text_projection", weights);
  text_projection = tp->to(at::kFloat);
  MD_CHECK(text_projection.dim() == 2 && text_projection.size(0) == tc.width && text_projection.size(1) == vc.output_dim,
           "{}: text_projection {} does not map the text width {} to the image embedding {}", weights,
           text_projection.sizes(), tc.width, vc.output_dim);
  vision_->eval(), text_->eval();
  vision_->to(device), text_->to(device);
  text_projection = text_projection.to(device);
}

std::string ClipScorer::describe() const {
  return fmt::format("CLIP {}: image tower {}; text tower {}", source_, vision_->config.summary(),
                     text_->config.summary());
}

Tensor ClipScorer::image_features(const Tensor& pixels) {
  torch::NoGradGuard ng;
  auto f = vision_->forward(pixels.to(device_, at::kFloat)).to(at::kCPU, at::kFloat);
  return f / f.norm(2, -1, true);
}

Tensor ClipScorer::text_features(const Tensor& ids) {
  torch::NoGradGuard ng;
  auto ids_d = ids.to(device_, at::kLong);
  auto h = text_->forward(ids_d);                       // (B, L, W) after ln_final
  auto eot = ids_d.argmax(-1);                          // open_clip: the highest id is <end_of_text>
  auto pooled = h.index({at::arange(h.size(0), ids_d.options()), eot});
  auto f = at::mm(pooled, text_projection).to(at::kCPU, at::kFloat);
  return f / f.norm(2, -1, true);
}

Tensor ClipScorer::tokenize(const std::vector<std::string>& captions) {
  static std::unique_ptr<text::BpeTokenizer> tok;
  if (!tok) tok = std::make_unique<text::BpeTokenizer>(text::clip_bpe_path());
  const int64_t L = text_->config.context_length;
  auto ids = torch::zeros({int64_t(captions.size()), L}, torch::kLong);
  for (size_t i = 0; i < captions.size(); ++i) {
    const auto v = tok->encode_padded(captions[i], L);
    std::copy(v.begin(), v.end(), ids[int64_t(i)].data_ptr<int64_t>());
  }
  return ids;
}

Tensor clip_scores(const Tensor& image_features, const Tensor& text_features) {
  MD_CHECK(image_features.sizes() == text_features.sizes(), "CLIP score: {} image and {} text features",
           image_features.sizes(), text_features.sizes());
  return 100.0 * (image_features.to(at::kDouble) * text_features.to(at::kDouble)).sum(-1);
}

double clip_score(const Tensor& scores) {
  MD_CHECK(scores.numel() > 0, "CLIP score of no images");
  return std::max(0.0, scores.to(at::kDouble).mean().item<double>());
}

}  // namespace microdit
