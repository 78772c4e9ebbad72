// MicroDiT configuration: a plain struct whose fields are the reference DiT constructor's
// arguments (micro_diffusion/models/dit.py), plus the per-block sizes derived from them.
#pragma once
#include <array>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace microdit {

struct ModelConfig {
  int input_size = 32;        // latent H = W
  int patch_size = 2;         // p
  int in_channels = 4;        // C
  int dim = 1024;             // D, backbone width
  int depth = 28;             // backbone blocks
  int head_dim = 64;          // hd
  int multiple_of = 256;      // FFN hidden rounding
  int caption_channels = 1024;  // Cc
  double pos_interp_scale = 1.0;
  double norm_eps = 1e-6;
  std::array<double, 2> qkv_ratio{0.5, 1.0};  // layer-wise scaling: linspace over depth
  std::array<double, 2> mlp_ratio{0.5, 4.0};
  int patch_mixer_depth = 6;
  int patch_mixer_dim = 768;  // Dm
  double patch_mixer_qkv_ratio = 1.0;
  double patch_mixer_mlp_ratio = 4.0;
  bool use_bias = false;
  int num_experts = 8;
  double expert_capacity = 2.0;
  int experts_every_n = 2;

  int grid() const { return input_size / patch_size; }         // tokens per side
  int num_tokens() const { return grid() * grid(); }           // T
  int patch_dim() const { return patch_size * patch_size * in_channels; }  // p*p*C
  int kept_tokens(double mask_ratio) const;                    // int(T * (1 - r))

  // Throws microdit::Error naming the first field that cannot work.
  void validate() const;
};

// Sizes of one DiT block, derived exactly as the reference derives them.
struct BlockSpec {
  int dim = 0;         // d, the block's width
  int attn_dim = 0;    // h, self-attention width (layer-wise scaled)
  int heads = 0;       // h / hd
  bool moe = false;    // expert-choice MoE FFN instead of SwiGLU
  int ffn_hidden = 0;  // n: SwiGLU hidden, or each expert's hidden
  double qkv_ratio = 1.0, mlp_ratio = 4.0;
};

// numpy.linspace(lo, hi, n) in float64, bit for bit (i*step + lo, last element = hi).
std::vector<double> linspace(double lo, double hi, int n);
int attention_width(int d, double qkv_ratio, int head_dim);  // h
int swiglu_hidden(int d, double mlp_ratio, int multiple_of);  // roundup(int(2*int(d*f)/3))
int moe_hidden(int d, double mlp_ratio, int multiple_of);     // roundup(int(d*f))
int expert_tokens(double capacity, int tokens, int experts);   // k = int(capacity*T'/E)

std::vector<BlockSpec> mixer_blocks(const ModelConfig& c);
std::vector<BlockSpec> backbone_blocks(const ModelConfig& c);

// Presets: MicroDiT_XL_2 and MicroDiT_Tiny_2 as published, and CPU-sized ones.
std::vector<std::string> preset_names();
ModelConfig preset(const std::string& name);

// Reads a mapping whose keys are ModelConfig field names, optionally with `preset: NAME`
// as the starting point. Unknown keys and wrong types are errors that name the key.
ModelConfig config_from_yaml(const YAML::Node& node);
ModelConfig config_from_yaml_file(const std::string& path);
std::string config_to_yaml(const ModelConfig& c);

}  // namespace microdit
