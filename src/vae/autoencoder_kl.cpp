#include "vae/autoencoder_kl.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "data/image.h"
#include "io/checkpoint.h"

namespace microdit {

// ---- config ------------------------------------------------------------------------------

VAEConfig VAEConfig::sdxl() { return VAEConfig{}; }

void VAEConfig::validate() const {
  MD_CHECK(in_channels >= 1 && out_channels >= 1 && latent_channels >= 1,
           "VAE config: in/out/latent channels must be >= 1");
  MD_CHECK(layers_per_block >= 1, "VAE config: layers_per_block must be >= 1, got {}", layers_per_block);
  MD_CHECK(!block_out_channels.empty() && block_out_channels.size() <= 8,
           "VAE config: block_out_channels must list 1 to 8 widths");
  MD_CHECK(norm_num_groups >= 1, "VAE config: norm_num_groups must be >= 1");
  for (auto c : block_out_channels)
    MD_CHECK(c >= 1 && c % norm_num_groups == 0,
             "VAE config: block_out_channels entry {} is not a positive multiple of norm_num_groups {}",
             c, norm_num_groups);
  MD_CHECK(scaling_factor > 0, "VAE config: scaling_factor must be > 0, got {}", scaling_factor);
}

std::string VAEConfig::summary() const {
  return fmt::format("AutoencoderKL(blocks [{}], layers {}, groups {}, latent {}, scale {}, shift {})",
                     fmt::join(block_out_channels, ", "), layers_per_block, norm_num_groups,
                     latent_channels, scaling_factor, shift_factor);
}

VAEConfig VAEConfig::from_json_text(const std::string& text, const std::string& src) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    fail("{}: not valid JSON ({})", src, msg.substr(0, msg.find('\n')));
  }
  MD_CHECK(j.is_object(), "{}: expected a JSON object", src);
  VAEConfig c;
  auto get_int = [&](const char* key, int64_t& dst) {
    if (!j.contains(key)) return;
    MD_CHECK(j[key].is_number_integer(), "{}: field '{}' must be an integer, got {}", src, key,
             j[key].dump());
    dst = j[key].get<int64_t>();
  };
  auto get_bool = [&](const char* key, bool& dst) {
    if (!j.contains(key) || j[key].is_null()) return;
    MD_CHECK(j[key].is_boolean(), "{}: field '{}' must be true or false, got {}", src, key, j[key].dump());
    dst = j[key].get<bool>();
  };
  auto get_double = [&](const char* key, double& dst, bool null_is_zero) {
    if (!j.contains(key)) return;
    if (j[key].is_null()) {
      MD_CHECK(null_is_zero, "{}: field '{}' must be a number, got null", src, key);
      dst = 0.0;
      return;
    }
    MD_CHECK(j[key].is_number(), "{}: field '{}' must be a number, got {}", src, key, j[key].dump());
    dst = j[key].get<double>();
  };
  if (j.contains("_class_name")) {
    MD_CHECK(j["_class_name"].is_string() && j["_class_name"].get<std::string>() == "AutoencoderKL",
             "{}: _class_name is {}, expected \"AutoencoderKL\"", src, j["_class_name"].dump());
  }
  get_int("in_channels", c.in_channels);
  get_int("out_channels", c.out_channels);
  get_int("latent_channels", c.latent_channels);
  get_int("layers_per_block", c.layers_per_block);
  get_int("norm_num_groups", c.norm_num_groups);
  if (j.contains("block_out_channels")) {
    const auto& b = j["block_out_channels"];
    MD_CHECK(b.is_array() && !b.empty(), "{}: field 'block_out_channels' must be a non-empty list, got {}",
             src, b.dump());
    c.block_out_channels.clear();
    for (const auto& v : b) {
      MD_CHECK(v.is_number_integer(), "{}: field 'block_out_channels' must hold integers, got {}", src,
               b.dump());
      c.block_out_channels.push_back(v.get<int64_t>());
    }
  }
  get_double("scaling_factor", c.scaling_factor, false);
  get_double("shift_factor", c.shift_factor, true);
  get_bool("mid_block_add_attention", c.mid_block_add_attention);
  get_bool("use_quant_conv", c.use_quant_conv);
  get_bool("use_post_quant_conv", c.use_post_quant_conv);
  if (j.contains("act_fn"))
    MD_CHECK(j["act_fn"] == "silu", "{}: act_fn {} is not supported (only \"silu\")", src, j["act_fn"].dump());
  auto check_types = [&](const char* key, const char* want) {
    if (!j.contains(key)) return;
    const auto& t = j[key];
    MD_CHECK(t.is_array(), "{}: field '{}' must be a list", src, key);
    MD_CHECK(t.size() == c.block_out_channels.size(),
             "{}: field '{}' has {} entries but block_out_channels has {}", src, key, t.size(),
             c.block_out_channels.size());
    for (const auto& v : t)
      MD_CHECK(v == want, "{}: field '{}' entry {} is not supported (only \"{}\")", src, key, v.dump(), want);
  };
  check_types("down_block_types", "DownEncoderBlock2D");
  check_types("up_block_types", "UpDecoderBlock2D");
  for (const char* key : {"latents_mean", "latents_std"})
    MD_CHECK(!j.contains(key) || j[key].is_null(),
             "{}: field '{}' is set; per-channel latent normalisation is not supported", src, key);
  try {
    c.validate();
  } catch (const Error& e) {
    fail("{}: {}", src, e.what());
  }
  return c;
}

VAEConfig VAEConfig::from_json_file(const std::string& path) {
  MD_CHECK(is_regular_file(path), "VAE config not found: {}", path);
  std::ifstream f(path, std::ios::binary);
  MD_CHECK(f, "cannot read VAE config {}", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return from_json_text(ss.str(), path);
}

// ---- posterior --------------------------------------------------------------------------

at::Tensor Posterior::sample_with_noise(const at::Tensor& eps) const {
  MD_CHECK(eps.sizes() == mean.sizes(), "posterior noise has shape {}, expected {}",
           c10::str(eps.sizes()), c10::str(mean.sizes()));
  return mean + at::exp(0.5 * logvar) * eps.to(mean.options());
}

at::Tensor Posterior::sample(std::optional<at::Generator> gen) const {
  // Drawn on the generator's device (CPU generator -> CPU noise moved over), as diffusers' randn_tensor.
  at::Tensor eps;
  if (gen.has_value() && gen->device() != mean.device())
    eps = at::randn(mean.sizes(), gen, mean.options().device(gen->device()));
  else
    eps = at::randn(mean.sizes(), gen, mean.options());
  return sample_with_noise(eps);
}

// ---- blocks -----------------------------------------------------------------------------

namespace vae {

namespace nn = torch::nn;
namespace F = torch::nn::functional;

namespace {
constexpr double kEps = 1e-6;
nn::GroupNorm group_norm(int64_t groups, int64_t c) {
  return nn::GroupNorm(nn::GroupNormOptions(groups, c).eps(kEps).affine(true));
}
nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride = 1, int64_t pad = -1) {
  if (pad < 0) pad = k / 2;
  return nn::Conv2d(nn::Conv2dOptions(in, out, k).stride(stride).padding(pad).bias(true));
}
// GroupNorm then SiLU, in place on the normalised copy.
Tensor norm_silu(nn::GroupNorm& norm, const Tensor& x) {
  auto h = norm->forward(x);
  return at::silu_(h);
}
}  // namespace

ResnetBlockImpl::ResnetBlockImpl(int64_t in, int64_t out, int64_t groups) {
  norm1 = register_module("norm1", group_norm(groups, in));
  conv1 = register_module("conv1", conv(in, out, 3));
  norm2 = register_module("norm2", group_norm(groups, out));
  conv2 = register_module("conv2", conv(out, out, 3));
  if (in != out) conv_shortcut = register_module("conv_shortcut", conv(in, out, 1));
}

Tensor ResnetBlockImpl::forward(const Tensor& x) {
  auto h = conv1->forward(norm_silu(norm1, x));
  h = conv2->forward(norm_silu(norm2, h));
  const Tensor s = conv_shortcut ? conv_shortcut->forward(x) : x;
  if (at::GradMode::is_enabled()) return s + h;
  return h.add_(s);
}

AttentionImpl::AttentionImpl(int64_t channels, int64_t groups) {
  group_norm = register_module("group_norm", vae::group_norm(groups, channels));
  to_q = register_module("to_q", Linear(channels, channels));
  to_k = register_module("to_k", Linear(channels, channels));
  to_v = register_module("to_v", Linear(channels, channels));
  auto to_out = register_module("to_out", nn::ModuleList());
  to_out0 = Linear(channels, channels);
  to_out->push_back(to_out0);
}

Tensor AttentionImpl::forward(const Tensor& x) {
  const auto B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // (B, C, H, W) -> normalised tokens (B, HW, C), token index y * W + x (a view when x is
  // channels-last).
  auto t = group_norm->forward(x).permute({0, 2, 3, 1}).reshape({B, H * W, C});
  auto q = to_q->forward(t).unsqueeze(1), k = to_k->forward(t).unsqueeze(1),
       v = to_v->forward(t).unsqueeze(1);
  auto o = at::scaled_dot_product_attention(q, k, v);  // one head, scale 1/sqrt(C)
  o = to_out0->forward(o.squeeze(1));                  // (B, HW, C)
  o = o.view({B, H, W, C}).permute({0, 3, 1, 2});      // (B, C, H, W), channels-last strides
  if (at::GradMode::is_enabled()) return o + x;
  return o.add_(x);
}

DownsampleImpl::DownsampleImpl(int64_t channels) {
  conv = register_module("conv", vae::conv(channels, channels, 3, 2, 0));
}
Tensor DownsampleImpl::forward(const Tensor& x) {
  return conv->forward(at::constant_pad_nd(x, {0, 1, 0, 1}, 0.0));  // right 1, bottom 1
}

UpsampleImpl::UpsampleImpl(int64_t channels) {
  conv = register_module("conv", vae::conv(channels, channels, 3));
}
Tensor UpsampleImpl::forward_reference(const Tensor& x) {
  auto up = at::upsample_nearest2d(x, {x.size(2) * 2, x.size(3) * 2});
  return conv->forward(up);
}

void UpsampleImpl::build_phase_weights() {
  torch::NoGradGuard no_grad;
  const Tensor& w = conv->weight;
  const int64_t version = w._version() + conv->bias._version();
  if (phase_weight_.defined() && phase_src_ == w.data_ptr() && phase_bias_src_ == conv->bias.data_ptr() &&
      phase_version_ == version)
    return;
  {
    // Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows
    // {i-1, i, i} (a = 0: taps [w0, w1 + w2] on rows i-1, i) or {i, i, i+1} (a = 1: taps
    // [w0 + w1, w2] on rows i, i+1); the same along columns. Sums in float32.
    const auto wf = w.to(at::kFloat);
    auto merge = [](const Tensor& t, int64_t dim, int64_t phase) {  // 3 taps -> 2 along dim
      auto t0 = t.select(dim, 0), t1 = t.select(dim, 1), t2 = t.select(dim, 2);
      return phase == 0 ? at::stack({t0, t1 + t2}, dim) : at::stack({t0 + t1, t2}, dim);
    };
    std::vector<Tensor> k;
    for (int64_t a = 0; a < 2; ++a) {
      auto rows = merge(wf, 2, a);                                  // (C, C, 2, 3)
      for (int64_t b = 0; b < 2; ++b) k.push_back(merge(rows, 3, b));  // (C, C, 2, 2)
    }
    phase_weight_ = at::cat(k, 0).to(w.scalar_type()).contiguous(w.suggest_memory_format());
    phase_bias_ = conv->bias.repeat({4});
    phase_src_ = w.data_ptr();
    phase_bias_src_ = conv->bias.data_ptr();
    phase_version_ = version;
  }
}

Tensor UpsampleImpl::forward(const Tensor& x) {
  if (!phase_conv || at::GradMode::is_enabled()) return forward_reference(x);
  build_phase_weights();
  const auto B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // Conv position (i + a, j + b) of the 1-padded input is phase (a, b)'s output (i, j).
  auto y = at::conv2d(at::constant_pad_nd(x, {1, 1, 1, 1}, 0.0), phase_weight_, phase_bias_)
               .unflatten(1, {2, 2, C});  // (B, 2, 2, C, H + 1, W + 1)
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && C > 1;
  // Interleave the phases into (B, C, 2H, 2W), keeping x's memory format.
  Tensor out = cl ? at::empty({B, H, 2, W, 2, C}, x.options()) : at::empty({B, C, H, 2, W, 2}, x.options());
  for (int64_t a = 0; a < 2; ++a)
    for (int64_t b = 0; b < 2; ++b) {
      auto p = y.select(1, a).select(1, b).narrow(2, a, H).narrow(3, b, W);  // (B, C, H, W)
      if (cl)
        out.select(2, a).select(3, b).copy_(p.permute({0, 2, 3, 1}));
      else
        out.select(3, a).select(4, b).copy_(p);
    }
  return cl ? out.view({B, 2 * H, 2 * W, C}).permute({0, 3, 1, 2}) : out.view({B, C, 2 * H, 2 * W});
}

MidBlockImpl::MidBlockImpl(int64_t c, int64_t groups, bool add_attention) {
  resnets = register_module("resnets", nn::ModuleList());
  resnets->push_back(ResnetBlock(c, c, groups));
  resnets->push_back(ResnetBlock(c, c, groups));
  if (add_attention) {
    attentions = register_module("attentions", nn::ModuleList());
    attentions->push_back(Attention(c, groups));
  }
}
Tensor MidBlockImpl::forward(const Tensor& x) {
  auto h = resnets[0]->as<ResnetBlock>()->forward(x);
  if (attentions) h = attentions[0]->as<Attention>()->forward(h);
  return resnets[1]->as<ResnetBlock>()->forward(h);
}

DownBlockImpl::DownBlockImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool down) {
  resnets = register_module("resnets", nn::ModuleList());
  for (int64_t j = 0; j < layers; ++j) resnets->push_back(ResnetBlock(j == 0 ? in : out, out, groups));
  if (down) {
    downsamplers = register_module("downsamplers", nn::ModuleList());
    downsamplers->push_back(Downsample(out));
  }
}
Tensor DownBlockImpl::forward(Tensor x) {
  for (auto& r : *resnets) x = r->as<ResnetBlock>()->forward(x);
  if (downsamplers) x = downsamplers[0]->as<Downsample>()->forward(x);
  return x;
}

UpBlockImpl::UpBlockImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool up) {
  resnets = register_module("resnets", nn::ModuleList());
  for (int64_t j = 0; j < layers; ++j) resnets->push_back(ResnetBlock(j == 0 ? in : out, out, groups));
  if (up) {
    upsamplers = register_module("upsamplers", nn::ModuleList());
    upsamplers->push_back(Upsample(out));
  }
}
Tensor UpBlockImpl::forward(Tensor x) {
  for (auto& r : *resnets) x = r->as<ResnetBlock>()->forward(x);
  if (upsamplers) x = upsamplers[0]->as<Upsample>()->forward(x);
  return x;
}

EncoderImpl::EncoderImpl(const VAEConfig& c) {
  const auto& ch = c.block_out_channels;
  const int64_t g = c.norm_num_groups, n = static_cast<int64_t>(ch.size());
  conv_in = register_module("conv_in", conv(c.in_channels, ch[0], 3));
  down_blocks = register_module("down_blocks", nn::ModuleList());
  int64_t prev = ch[0];
  for (int64_t i = 0; i < n; ++i) {
    down_blocks->push_back(DownBlock(prev, ch[i], c.layers_per_block, g, i + 1 < n));
    prev = ch[i];
  }
  mid_block = register_module("mid_block", MidBlock(ch.back(), g, c.mid_block_add_attention));
  conv_norm_out = register_module("conv_norm_out", group_norm(g, ch.back()));
  conv_out = register_module("conv_out", conv(ch.back(), 2 * c.latent_channels, 3));
}
Tensor EncoderImpl::forward(const Tensor& x) {
  auto h = conv_in->forward(x);
  for (auto& b : *down_blocks) h = b->as<DownBlock>()->forward(h);
  h = mid_block->forward(h);
  return conv_out->forward(norm_silu(conv_norm_out, h));
}

DecoderImpl::DecoderImpl(const VAEConfig& c) {
  std::vector<int64_t> ch(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  const int64_t g = c.norm_num_groups, n = static_cast<int64_t>(ch.size());
  conv_in = register_module("conv_in", conv(c.latent_channels, ch[0], 3));
  mid_block = register_module("mid_block", MidBlock(ch[0], g, c.mid_block_add_attention));
  up_blocks = register_module("up_blocks", nn::ModuleList());
  int64_t prev = ch[0];
  for (int64_t i = 0; i < n; ++i) {
    up_blocks->push_back(UpBlock(prev, ch[i], c.layers_per_block + 1, g, i + 1 < n));
    prev = ch[i];
  }
  conv_norm_out = register_module("conv_norm_out", group_norm(g, ch.back()));
  conv_out = register_module("conv_out", conv(ch.back(), c.out_channels, 3));
}
Tensor DecoderImpl::forward(const Tensor& z) {
  auto h = mid_block->forward(conv_in->forward(z));
  for (auto& b : *up_blocks) h = b->as<UpBlock>()->forward(h);
  return conv_out->forward(norm_silu(conv_norm_out, h));
}

}  // namespace vae

// ---- the autoencoder --------------------------------------------------------------------

AutoencoderKLImpl::AutoencoderKLImpl(VAEConfig cfg) : cfg_(std::move(cfg)) {
  cfg_.validate();
  encoder = register_module("encoder", vae::Encoder(cfg_));
  decoder = register_module("decoder", vae::Decoder(cfg_));
  const int64_t L = cfg_.latent_channels;
  if (cfg_.use_quant_conv)
    quant_conv = register_module("quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2 * L, 2 * L, 1)));
  if (cfg_.use_post_quant_conv)
    post_quant_conv =
        register_module("post_quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(L, L, 1)));
}

c10::Device AutoencoderKLImpl::device() const { return encoder->conv_in->weight.device(); }
c10::ScalarType AutoencoderKLImpl::dtype() const { return encoder->conv_in->weight.scalar_type(); }

void AutoencoderKLImpl::set_channels_last(bool on) {
  torch::NoGradGuard no_grad;
  const auto fmt = on ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  for (auto& p : parameters())
    if (p.dim() == 4) p.set_data(p.contiguous(fmt));
  channels_last_ = on;
}

void AutoencoderKLImpl::set_phase_upsample(bool on) {
  for (auto& m : decoder->modules())
    if (auto* u = m->as<vae::Upsample>()) {
      u->phase_conv = on;
      if (on) u->build_phase_weights();
    }
}

Posterior AutoencoderKLImpl::encode(const at::Tensor& x) {
  MD_CHECK(x.dim() == 4 && x.size(1) == cfg_.in_channels,
           "VAE encode: expected images of shape (B, {}, H, W), got {}", cfg_.in_channels, c10::str(x.sizes()));
  MD_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "VAE encode: image too small: {}", c10::str(x.sizes()));
  torch::NoGradGuard no_grad;
  auto h = x.to(device(), dtype());
  if (channels_last_) h = h.contiguous(at::MemoryFormat::ChannelsLast);
  h = encoder->forward(h);
  if (quant_conv) h = quant_conv->forward(h);
  auto parts = h.contiguous().chunk(2, 1);  // mean = channels [0, C), logvar = [C, 2C)
  return Posterior{parts[0], parts[1].clamp(-30.0, 20.0)};
}

at::Tensor AutoencoderKLImpl::decode(const at::Tensor& z) {
  MD_CHECK(z.dim() == 4 && z.size(1) == cfg_.latent_channels,
           "VAE decode: expected latents of shape (B, {}, h, w), got {}", cfg_.latent_channels,
           c10::str(z.sizes()));
  torch::NoGradGuard no_grad;
  auto h = z.to(device(), dtype());
  if (channels_last_) h = h.contiguous(at::MemoryFormat::ChannelsLast);
  if (post_quant_conv) h = post_quant_conv->forward(h);
  return decoder->forward(h).contiguous();
}

// ---- checkpoint names -------------------------------------------------------------------

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

// One key to its diffusers name ("" when it is not a VAE key of any known naming).
std::string to_diffusers_name(const std::string& key, int64_t levels) {
  static const std::regex enc_block(R"(^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$)");
  static const std::regex enc_down(R"(^encoder\.down\.(\d+)\.downsample\.conv\.(.*)$)");
  static const std::regex dec_block(R"(^decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$)");
  static const std::regex dec_up(R"(^decoder\.up\.(\d+)\.upsample\.conv\.(.*)$)");
  static const std::regex mid_block(R"(^(encoder|decoder)\.mid\.block_([12])\.(.*)$)");
  static const std::regex mid_attn(R"(^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)$)");
  static const std::regex norm_out(R"(^(encoder|decoder)\.norm_out\.(.*)$)");
  static const std::regex old_attn(R"(^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(.*)$)");
  auto resnet_tail = [](std::string tail) {
    if (starts_with(tail, "nin_shortcut.")) tail = "conv_shortcut." + tail.substr(13);
    return tail;
  };
  std::smatch m;
  if (std::regex_match(key, m, enc_block))
    return fmt::format("encoder.down_blocks.{}.resnets.{}.{}", m[1].str(), m[2].str(), resnet_tail(m[3]));
  if (std::regex_match(key, m, enc_down))
    return fmt::format("encoder.down_blocks.{}.downsamplers.0.conv.{}", m[1].str(), m[2].str());
  if (std::regex_match(key, m, dec_block)) {
    const int64_t i = levels - 1 - std::stoll(m[1].str());
    if (i < 0) return "";
    return fmt::format("decoder.up_blocks.{}.resnets.{}.{}", i, m[2].str(), resnet_tail(m[3]));
  }
  if (std::regex_match(key, m, dec_up)) {
    const int64_t i = levels - 1 - std::stoll(m[1].str());
    if (i < 0) return "";
    return fmt::format("decoder.up_blocks.{}.upsamplers.0.conv.{}", i, m[2].str());
  }
  if (std::regex_match(key, m, mid_block))
    return fmt::format("{}.mid_block.resnets.{}.{}", m[1].str(), m[2].str() == "1" ? 0 : 1, resnet_tail(m[3]));
  if (std::regex_match(key, m, mid_attn)) {
    static const std::map<std::string, std::string> names{
        {"norm", "group_norm"}, {"q", "to_q"}, {"k", "to_k"}, {"v", "to_v"}, {"proj_out", "to_out.0"}};
    return fmt::format("{}.mid_block.attentions.0.{}.{}", m[1].str(), names.at(m[2]), m[3].str());
  }
  if (std::regex_match(key, m, norm_out)) return fmt::format("{}.conv_norm_out.{}", m[1].str(), m[2].str());
  if (std::regex_match(key, m, old_attn)) {
    static const std::map<std::string, std::string> names{
        {"query", "to_q"}, {"key", "to_k"}, {"value", "to_v"}, {"proj_attn", "to_out.0"}};
    return m[1].str() + names.at(m[2]) + "." + m[3].str();
  }
  return key;
}

bool is_attention_linear_weight(const std::string& name) {
  static const std::regex re(R"(\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$)");
  return std::regex_search(name, re);
}

struct MappedTensors {
  NamedTensors tensors;                       // diffusers names
  std::map<std::string, std::string> origin;  // diffusers name -> name in the file
};

MappedTensors map_to_diffusers(const NamedTensors& in, int64_t levels, const std::string& where) {
  // A prefix (full SD checkpoints): keep only the keys under it.
  std::string prefix;
  for (const char* p : {"first_stage_model.", "vae."}) {
    for (const auto& [k, t] : in)
      if (starts_with(k, p)) {
        prefix = p;
        break;
      }
    if (!prefix.empty()) break;
  }
  MappedTensors out;
  for (const auto& [k, t] : in) {
    if (!prefix.empty() && !starts_with(k, prefix)) continue;
    const std::string key = k.substr(prefix.size());
    std::string name = to_diffusers_name(key, levels);
    MD_CHECK(!name.empty(), "{}: tensor '{}' names decoder level beyond the {} levels of the config",
             where, k, levels);
    Tensor v = t;
    // LDM attention projections are 1x1 convs: (C, C, 1, 1) -> Linear (C, C).
    if (is_attention_linear_weight(name) && v.dim() == 4 && v.size(2) == 1 && v.size(3) == 1)
      v = v.flatten(1);
    auto [it, fresh] = out.origin.emplace(name, k);
    MD_CHECK(fresh, "{}: tensors '{}' and '{}' both map to '{}'", where, it->second, k, name);
    out.tensors.emplace_back(std::move(name), std::move(v));
  }
  return out;
}

}  // namespace

NamedTensors vae_state_dict_to_diffusers(const NamedTensors& tensors, int64_t num_levels) {
  return map_to_diffusers(tensors, num_levels, "VAE state dict").tensors;
}

std::pair<std::string, std::string> resolve_vae_files(const std::string& path) {
  MD_CHECK(!path.empty(), "no VAE given");
  if (is_directory(path)) {
    std::string dir = path;
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    const std::string cfg = dir + "/config.json";
    for (const char* name : {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                             "diffusion_pytorch_model.bf16.safetensors"}) {
      const std::string w = dir + "/" + name;
      if (is_regular_file(w)) return {w, is_regular_file(cfg) ? cfg : ""};
    }
    // A whole diffusers pipeline folder: its vae/ subfolder.
    if (!is_regular_file(cfg) && is_directory(dir + "/vae")) return resolve_vae_files(dir + "/vae");
    fail("{}: no diffusion_pytorch_model.safetensors (or .fp16.safetensors) in this VAE folder", path);
  }
  MD_CHECK(is_regular_file(path), "VAE weights not found: {}", path);
  const auto slash = path.rfind('/');
  const std::string cfg = (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) + "/config.json";
  return {path, is_regular_file(cfg) ? cfg : ""};
}

AutoencoderKL load_vae(const std::string& path, c10::Device device, c10::ScalarType dtype) {
  MD_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
           "VAE dtype must be float32, float16, bfloat16 or float64, got {}", c10::toString(dtype));
  const auto [weights, cfg_path] = resolve_vae_files(path);
  const VAEConfig cfg = cfg_path.empty() ? VAEConfig::sdxl() : VAEConfig::from_json_file(cfg_path);
  const auto file = read_safetensors(weights);
  const int64_t levels = static_cast<int64_t>(cfg.block_out_channels.size());
  auto mapped = map_to_diffusers(file.tensors, levels, weights);

  AutoencoderKL model(cfg);
  const auto targets = state_dict(*model);
  std::map<std::string, Tensor> given;
  for (const auto& [k, t] : mapped.tensors) given[k] = t;
  const std::string cfg_note = cfg_path.empty() ? " (SDXL config assumed: no config.json beside it)" : "";
  std::set<std::string> known;
  for (const auto& [name, dst] : targets) {
    known.insert(name);
    auto it = given.find(name);
    MD_CHECK(it != given.end(), "{}: missing tensor '{}' (shape [{}]){}", weights, name,
             fmt::join(dst.sizes(), ", "), cfg_note);
    const std::string& orig = mapped.origin.at(name);
    const std::string shown = orig == name ? "'" + name + "'" : fmt::format("'{}' (as '{}')", orig, name);
    MD_CHECK(it->second.sizes() == dst.sizes(), "{}: tensor {} has shape [{}], expected [{}]{}", weights, shown,
             fmt::join(it->second.sizes(), ", "), fmt::join(dst.sizes(), ", "), cfg_note);
    const auto st = it->second.scalar_type();
    MD_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
             "{}: tensor {} has dtype {}, expected a floating-point type", weights, shown, c10::toString(st));
  }
  for (const auto& [k, t] : mapped.tensors)
    MD_CHECK(known.count(k), "{}: unexpected tensor '{}' (not part of {}){}", weights, mapped.origin.at(k),
             cfg.summary(), cfg_note);
  load_state_dict(*model, mapped.tensors, {}, weights);
  model->to(device, dtype);
  model->eval();
  // Channels-last speeds up oneDNN's CPU convolutions (docs/vae.md); CUDA keeps the default.
  model->set_channels_last(device.is_cpu());
  model->set_phase_upsample(true);
  return model;
}

// ---- scaling and pictures -----------------------------------------------------------------

at::Tensor scale_latents(const at::Tensor& z, const VAEConfig& c) {
  return (z - c.shift_factor) * c.scaling_factor;
}
at::Tensor unscale_latents(const at::Tensor& scaled, const VAEConfig& c) {
  return scaled / c.scaling_factor + c.shift_factor;
}

std::vector<Image> vae_output_to_images(const at::Tensor& decoded) {
  MD_CHECK(decoded.dim() == 4 && decoded.size(1) == 3, "expected decoded images (B, 3, H, W), got {}",
           c10::str(decoded.sizes()));
  // The reference's clamp(x / 2 + 0.5, 0, 1), mapped back to [-1, 1] for the project's uint8 rule.
  auto unit = (decoded.detach().to(at::kFloat) / 2 + 0.5).clamp(0.0, 1.0);
  return tensor_to_images(unit * 2 - 1);
}

std::vector<Image> decode_latents_to_images(AutoencoderKL& vae, const at::Tensor& scaled_latents) {
  return vae_output_to_images(vae->decode(unscale_latents(scaled_latents.to(at::kFloat), vae->config())));
}

}  // namespace microdit
