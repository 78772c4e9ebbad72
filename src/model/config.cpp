#include "model/config.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <fstream>
#include <map>

#include "core/error.h"

namespace microdit {

static int round_up(int v, int multiple) { return multiple * ((v + multiple - 1) / multiple); }

int ModelConfig::kept_tokens(double mask_ratio) const {
  return static_cast<int>(num_tokens() * (1.0 - mask_ratio));
}

std::vector<double> linspace(double lo, double hi, int n) {
  std::vector<double> v(static_cast<size_t>(std::max(n, 0)));
  if (n == 1) v[0] = lo;
  if (n <= 1) return v;
  const double step = (hi - lo) / (n - 1);
  for (int i = 0; i < n; ++i) v[i] = i * step + lo;
  v[n - 1] = hi;
  return v;
}

int attention_width(int d, double qkv_ratio, int head_dim) {
  if (qkv_ratio == 1.0) return d;
  const int unit = 2 * head_dim;
  return unit * ((static_cast<int>(d * qkv_ratio) + unit - 1) / unit);
}

int swiglu_hidden(int d, double mlp_ratio, int multiple_of) {
  const int m = static_cast<int>(d * mlp_ratio);
  return round_up(static_cast<int>(2.0 * m / 3.0), multiple_of);
}

int moe_hidden(int d, double mlp_ratio, int multiple_of) {
  return round_up(static_cast<int>(d * mlp_ratio), multiple_of);
}

int expert_tokens(double capacity, int tokens, int experts) {
  return static_cast<int>(capacity * tokens / experts);
}

static BlockSpec make_block(int d, double q, double f, bool moe, const ModelConfig& c) {
  BlockSpec b;
  b.dim = d;
  b.qkv_ratio = q;
  b.mlp_ratio = f;
  b.attn_dim = attention_width(d, q, c.head_dim);
  b.heads = b.attn_dim / c.head_dim;
  b.moe = moe;
  b.ffn_hidden = moe ? moe_hidden(d, f, c.multiple_of) : swiglu_hidden(d, f, c.multiple_of);
  return b;
}

std::vector<BlockSpec> mixer_blocks(const ModelConfig& c) {
  std::vector<BlockSpec> out;
  for (int i = 0; i < c.patch_mixer_depth; ++i) {
    const bool moe = i >= 1 && (i + 1) % c.experts_every_n == 0;
    out.push_back(make_block(c.patch_mixer_dim, c.patch_mixer_qkv_ratio, c.patch_mixer_mlp_ratio,
                             moe, c));
  }
  return out;
}

std::vector<BlockSpec> backbone_blocks(const ModelConfig& c) {
  const auto q = linspace(c.qkv_ratio[0], c.qkv_ratio[1], c.depth);
  const auto f = linspace(c.mlp_ratio[0], c.mlp_ratio[1], c.depth);
  std::vector<BlockSpec> out;
  for (int i = 0; i < c.depth; ++i) {
    const bool moe = i < c.depth - 1 && (i + 1) % c.experts_every_n == 0;
    out.push_back(make_block(c.dim, q[i], f[i], moe, c));
  }
  return out;
}

void ModelConfig::validate() const {
  auto positive = [](const char* name, double v) {
    MD_CHECK(v > 0, "model config: {} must be positive, got {}", name, v);
  };
  positive("input_size", input_size);
  positive("patch_size", patch_size);
  positive("in_channels", in_channels);
  positive("dim", dim);
  positive("depth", depth);
  positive("head_dim", head_dim);
  positive("multiple_of", multiple_of);
  positive("caption_channels", caption_channels);
  positive("pos_interp_scale", pos_interp_scale);
  positive("norm_eps", norm_eps);
  positive("patch_mixer_dim", patch_mixer_dim);
  positive("num_experts", num_experts);
  positive("expert_capacity", expert_capacity);
  positive("experts_every_n", experts_every_n);
  MD_CHECK(patch_mixer_depth >= 0, "model config: patch_mixer_depth must be >= 0, got {}",
           patch_mixer_depth);
  MD_CHECK(input_size % patch_size == 0,
           "model config: the {}x{} grid is not divisible by patch_size {}", input_size,
           input_size, patch_size);
  MD_CHECK(dim % head_dim == 0, "model config: dim {} is not divisible by head_dim {}", dim,
           head_dim);
  MD_CHECK(patch_mixer_dim % head_dim == 0,
           "model config: patch_mixer_dim {} is not divisible by head_dim {}", patch_mixer_dim,
           head_dim);
  MD_CHECK(dim % 4 == 0, "model config: dim {} must be divisible by 4 (2D sin-cos positions)",
           dim);
  MD_CHECK(expert_capacity <= num_experts,
           "model config: expert_capacity {} exceeds num_experts {} (an expert would pick more "
           "tokens than exist)",
           expert_capacity, num_experts);
  for (double r : qkv_ratio) positive("qkv_ratio", r);
  for (double r : mlp_ratio) positive("mlp_ratio", r);
  positive("patch_mixer_qkv_ratio", patch_mixer_qkv_ratio);
  positive("patch_mixer_mlp_ratio", patch_mixer_mlp_ratio);
  for (const auto& b : backbone_blocks(*this))
    MD_CHECK(b.attn_dim % head_dim == 0 && b.ffn_hidden > 0,
             "model config: a backbone block gets attention width {} / FFN hidden {}", b.attn_dim,
             b.ffn_hidden);
}

// ---- presets ------------------------------------------------------------------------

static ModelConfig published(int dim, int depth, int head_dim, int mixer_depth, int mixer_dim) {
  ModelConfig c;  // the defaults above are the shared published values
  c.dim = dim;
  c.depth = depth;
  c.head_dim = head_dim;
  c.patch_mixer_depth = mixer_depth;
  c.patch_mixer_dim = mixer_dim;
  return c;
}

static const std::map<std::string, ModelConfig>& presets() {
  static const std::map<std::string, ModelConfig> table = [] {
    std::map<std::string, ModelConfig> t;
    t["MicroDiT_XL_2"] = published(1024, 28, 64, 6, 768);
    t["MicroDiT_Tiny_2"] = published(512, 16, 32, 4, 512);
    // CPU-sized: same design, narrower and shallower, finer FFN rounding.
    ModelConfig nano = published(256, 8, 32, 2, 256);
    nano.multiple_of = 64;
    t["MicroDiT_Nano_2"] = nano;
    ModelConfig pico = published(128, 6, 32, 2, 128);
    pico.multiple_of = 32;
    pico.num_experts = 4;
    t["MicroDiT_Pico_2"] = pico;
    return t;
  }();
  return table;
}

std::vector<std::string> preset_names() {
  return {"MicroDiT_XL_2", "MicroDiT_Tiny_2", "MicroDiT_Nano_2", "MicroDiT_Pico_2"};
}

ModelConfig preset(const std::string& name) {
  auto it = presets().find(name);
  if (it == presets().end()) {
    std::string all;
    for (const auto& n : preset_names()) all += (all.empty() ? "" : ", ") + n;
    fail("unknown model preset '{}' (known: {})", name, all);
  }
  return it->second;
}

// ---- YAML ---------------------------------------------------------------------------

template <class T>
static T as(const YAML::Node& v, const std::string& key, const char* type) {
  try {
    return v.as<T>();
  } catch (const YAML::Exception&) {
    fail("model config: key '{}' must be {}", key, type);
  }
}

ModelConfig config_from_yaml(const YAML::Node& node) {
  MD_CHECK(node.IsMap(), "model config: expected a mapping of field: value");
  ModelConfig c;
  if (node["preset"]) c = preset(as<std::string>(node["preset"], "preset", "a preset name"));
  for (const auto& kv : node) {
    const std::string key = as<std::string>(kv.first, "?", "a string");
    const YAML::Node& v = kv.second;
    auto i = [&](int& f) { f = as<int>(v, key, "an integer"); };
    auto d = [&](double& f) { f = as<double>(v, key, "a number"); };
    auto pair = [&](std::array<double, 2>& f) {
      MD_CHECK(v.IsSequence() && v.size() == 2, "model config: key '{}' must be [lo, hi]", key);
      f = {as<double>(v[0], key, "a number"), as<double>(v[1], key, "a number")};
    };
    if (key == "preset") continue;
    else if (key == "input_size") i(c.input_size);
    else if (key == "patch_size") i(c.patch_size);
    else if (key == "in_channels") i(c.in_channels);
    else if (key == "dim") i(c.dim);
    else if (key == "depth") i(c.depth);
    else if (key == "head_dim") i(c.head_dim);
    else if (key == "multiple_of") i(c.multiple_of);
    else if (key == "caption_channels") i(c.caption_channels);
    else if (key == "pos_interp_scale") d(c.pos_interp_scale);
    else if (key == "norm_eps") d(c.norm_eps);
    else if (key == "qkv_ratio") pair(c.qkv_ratio);
    else if (key == "mlp_ratio") pair(c.mlp_ratio);
    else if (key == "patch_mixer_depth") i(c.patch_mixer_depth);
    else if (key == "patch_mixer_dim") i(c.patch_mixer_dim);
    else if (key == "patch_mixer_qkv_ratio") d(c.patch_mixer_qkv_ratio);
    else if (key == "patch_mixer_mlp_ratio") d(c.patch_mixer_mlp_ratio);
    else if (key == "use_bias") c.use_bias = as<bool>(v, key, "true or false");
    else if (key == "num_experts") i(c.num_experts);
    else if (key == "expert_capacity") d(c.expert_capacity);
    else if (key == "experts_every_n") i(c.experts_every_n);
    else fail("model config: unknown key '{}'", key);
  }
  c.validate();
  return c;
}

ModelConfig config_from_yaml_file(const std::string& path) {
  std::ifstream f(path);
  MD_CHECK(f.good(), "cannot open config file '{}'", path);
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    fail("config file '{}': {}", path, e.what());
  }
  return config_from_yaml(root["model"] ? root["model"] : root);
}

std::string config_to_yaml(const ModelConfig& c) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  e << YAML::Key << "input_size" << YAML::Value << c.input_size;
  e << YAML::Key << "patch_size" << YAML::Value << c.patch_size;
  e << YAML::Key << "in_channels" << YAML::Value << c.in_channels;
  e << YAML::Key << "dim" << YAML::Value << c.dim;
  e << YAML::Key << "depth" << YAML::Value << c.depth;
  e << YAML::Key << "head_dim" << YAML::Value << c.head_dim;
  e << YAML::Key << "multiple_of" << YAML::Value << c.multiple_of;
  e << YAML::Key << "caption_channels" << YAML::Value << c.caption_channels;
  e << YAML::Key << "pos_interp_scale" << YAML::Value << c.pos_interp_scale;
  e << YAML::Key << "norm_eps" << YAML::Value << c.norm_eps;
  e << YAML::Key << "qkv_ratio" << YAML::Value << YAML::Flow << YAML::BeginSeq << c.qkv_ratio[0]
    << c.qkv_ratio[1] << YAML::EndSeq;
  e << YAML::Key << "mlp_ratio" << YAML::Value << YAML::Flow << YAML::BeginSeq << c.mlp_ratio[0]
    << c.mlp_ratio[1] << YAML::EndSeq;
  e << YAML::Key << "patch_mixer_depth" << YAML::Value << c.patch_mixer_depth;
  e << YAML::Key << "patch_mixer_dim" << YAML::Value << c.patch_mixer_dim;
  e << YAML::Key << "patch_mixer_qkv_ratio" << YAML::Value << c.patch_mixer_qkv_ratio;
  e << YAML::Key << "patch_mixer_mlp_ratio" << YAML::Value << c.patch_mixer_mlp_ratio;
  e << YAML::Key << "use_bias" << YAML::Value << c.use_bias;
  e << YAML::Key << "num_experts" << YAML::Value << c.num_experts;
  e << YAML::Key << "expert_capacity" << YAML::Value << c.expert_capacity;
  e << YAML::Key << "experts_every_n" << YAML::Value << c.experts_every_n;
  e << YAML::EndMap;
  return e.c_str();
}

}  // namespace microdit
