#include "text/clip.h"

#include <fmt/format.h>

#include <map>

#include "core/error.h"

namespace microdit::text {

namespace nn = torch::nn;

void ClipTextConfig::validate() const {
  MD_CHECK(context_length > 0 && vocab_size > 0 && width > 0 && layers > 0 && mlp_ratio > 0,
           "CLIP text config: sizes must be positive");
  MD_CHECK(heads > 0 && width % heads == 0, "CLIP text config: width {} not divisible by heads {}",
           width, heads);
}

std::string ClipTextConfig::summary() const {
  return fmt::format("width {}, layers {}, heads {}, context {}, vocab {}, {}", width, layers,
                     heads, context_length, vocab_size, quick_gelu ? "quick_gelu" : "gelu");
}

ClipTextConfig clip_vit_h_14() { return ClipTextConfig{}; }

ClipMlpImpl::ClipMlpImpl(int64_t width, int64_t hidden, bool quick_gelu) : quick_gelu(quick_gelu) {
  c_fc = register_module("c_fc", Linear(width, hidden));
  c_proj = register_module("c_proj", Linear(hidden, width));
}

Tensor ClipMlpImpl::forward(const Tensor& x) {
  auto h = c_fc(x);
  h = quick_gelu ? h * at::sigmoid(1.702 * h) : at::gelu(h);
  return c_proj(h);
}

ClipAttentionImpl::ClipAttentionImpl(int64_t width, int64_t heads) : heads(heads) {
  in_proj_weight = register_parameter("in_proj_weight", torch::empty({3 * width, width}));
  in_proj_bias = register_parameter("in_proj_bias", torch::zeros({3 * width}));
  nn::init::xavier_uniform_(in_proj_weight);
  out_proj = register_module("out_proj", Linear(width, width));
}

Tensor ClipAttentionImpl::forward(const Tensor& x) {
  const int64_t B = x.size(0), L = x.size(1), W = x.size(2);
  auto qkv = microdit::linear(x, in_proj_weight, in_proj_bias).view({B, L, 3, heads, W / heads});
  qkv = qkv.permute({2, 0, 3, 1, 4});  // (3, B, H, L, hd)
  auto o = at::scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], {}, 0.0, /*is_causal=*/true);
  return out_proj(o.transpose(1, 2).reshape({B, L, W}));
}

ResidualAttentionBlockImpl::ResidualAttentionBlockImpl(const ClipTextConfig& c) {
  auto ln = [&] { return nn::LayerNorm(nn::LayerNormOptions({c.width}).eps(c.eps)); };
  ln_1 = register_module("ln_1", ln());
  attn = register_module("attn", ClipAttention(c.width, c.heads));
  ln_2 = register_module("ln_2", ln());
  mlp = register_module("mlp", ClipMlp(c.width, int64_t(c.width * c.mlp_ratio), c.quick_gelu));
}

Tensor ResidualAttentionBlockImpl::forward(const Tensor& x) {
  auto h = x + attn(ln_1(x));
  return h + mlp(ln_2(h));
}

ClipTextModelImpl::ClipTextModelImpl(const ClipTextConfig& c) : config(c) {
  c.validate();
  token_embedding = register_module("token_embedding", nn::Embedding(c.vocab_size, c.width));
  positional_embedding =
      register_parameter("positional_embedding", torch::randn({c.context_length, c.width}) * 0.01);
  transformer = register_module("transformer", std::make_shared<nn::Module>());
  resblocks = nn::ModuleList();
  for (int64_t i = 0; i < c.layers; ++i) resblocks->push_back(ResidualAttentionBlock(c));
  transformer->register_module("resblocks", resblocks);
  ln_final = register_module("ln_final", nn::LayerNorm(nn::LayerNormOptions({c.width}).eps(c.eps)));
}

Tensor ClipTextModelImpl::forward(const Tensor& ids, int64_t skip_last) {
  const int64_t L = ids.size(1);
  MD_CHECK(L <= config.context_length, "text length {} exceeds the CLIP context length {}", L,
           config.context_length);
  MD_CHECK(skip_last >= 0 && skip_last < config.layers, "cannot skip {} of {} CLIP blocks",
           skip_last, config.layers);
  auto x = token_embedding(ids) + positional_embedding.slice(0, 0, L);
  for (int64_t i = 0; i < config.layers - skip_last; ++i)
    x = resblocks[size_t(i)]->as<ResidualAttentionBlock>()->forward(x);
  return ln_final(x);
}

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

// Hugging Face CLIPTextModel -> open_clip names.
NamedTensors from_hf(const NamedTensors& in) {
  std::map<std::string, Tensor> qkv;  // "transformer.resblocks.N.attn.in_proj_weight.q" ...
  NamedTensors out;
  auto rename = [](std::string k) -> std::string {
    const std::string enc = "encoder.layers.";
    if (k == "embeddings.token_embedding.weight") return "token_embedding.weight";
    if (k == "embeddings.position_embedding.weight") return "positional_embedding";
    if (starts_with(k, "final_layer_norm.")) return "ln_final." + k.substr(17);
    if (!starts_with(k, enc)) return "";
    auto dot = k.find('.', enc.size());
    std::string n = k.substr(enc.size(), dot - enc.size()), rest = k.substr(dot + 1);
    std::string p = "transformer.resblocks." + n + ".";
    static const std::pair<const char*, const char*> map[] = {
        {"self_attn.out_proj.", "attn.out_proj."}, {"layer_norm1.", "ln_1."},
        {"layer_norm2.", "ln_2."}, {"mlp.fc1.", "mlp.c_fc."}, {"mlp.fc2.", "mlp.c_proj."}};
    for (auto [a, b] : map)
      if (starts_with(rest, a)) return p + b + rest.substr(std::string(a).size());
    for (const char* q : {"q", "k", "v"})
      if (starts_with(rest, fmt::format("self_attn.{}_proj.", q)))
        return p + "attn.in_proj_" + rest.substr(rest.rfind('.') + 1) + "." + q;
    return "";
  };
  for (const auto& [k0, t] : in) {
    if (!starts_with(k0, "text_model.")) continue;
    const std::string k = rename(k0.substr(11));
    if (k.empty()) continue;
    if (k.size() > 2 && k[k.size() - 2] == '.' && k.find(".attn.in_proj_") != std::string::npos)
      qkv[k] = t;
    else
      out.emplace_back(k, t);
  }
  for (const auto& [k, t] : qkv) {
    if (k.back() != 'q') continue;
    const std::string base = k.substr(0, k.size() - 2);
    MD_CHECK(qkv.count(base + ".k") && qkv.count(base + ".v"), "CLIPTextModel checkpoint lacks the k or v "
             "projection of {}", base);
    out.emplace_back(base, torch::cat({t, qkv.at(base + ".k"), qkv.at(base + ".v")}, 0));
  }
  return out;
}

}  // namespace

NamedTensors clip_text_state_dict(const NamedTensors& tensors) {
  for (const auto& [k, t] : tensors)
    if (starts_with(k, "text_model.")) return from_hf(tensors);
  NamedTensors out;
  for (const auto& [k0, t] : tensors) {
    std::string k = starts_with(k0, "text.") ? k0.substr(5) : k0;
    if (starts_with(k, "token_embedding.") || k == "positional_embedding" ||
        starts_with(k, "transformer.") || starts_with(k, "ln_final."))
      out.emplace_back(k, t);
  }
  return out;
}

ClipTextConfig clip_config_from_tensors(const NamedTensors& text) {
  auto find = [&](const std::string& k) -> const Tensor& {
    for (const auto& [n, t] : text)
      if (n == k) return t;
    fail("CLIP text checkpoint has no '{}'", k);
  };
  ClipTextConfig c;
  const auto& tok = find("token_embedding.weight");
  const auto& pos = find("positional_embedding");
  MD_CHECK(tok.dim() == 2 && pos.dim() == 2, "CLIP text checkpoint: embeddings must be 2-D");
  c.vocab_size = tok.size(0);
  c.width = tok.size(1);
  c.context_length = pos.size(0);
  c.heads = std::max<int64_t>(1, c.width / 64);
  c.layers = 0;
  for (const auto& [n, t] : text)
    if (starts_with(n, "transformer.resblocks.") && n.ends_with(".ln_1.weight")) ++c.layers;
  const auto& fc = find("transformer.resblocks.0.mlp.c_fc.weight");
  c.mlp_ratio = double(fc.size(0)) / double(c.width);
  c.validate();
  return c;
}

}  // namespace microdit::text
