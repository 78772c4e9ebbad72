// The SDXL VAE: diffusers' AutoencoderKL (encoder -> quant_conv -> diagonal Gaussian posterior;
// post_quant_conv -> decoder), spec in ../shared/docs/DATA_PATH.md section 1. Registered module
// and parameter names equal diffusers' state-dict names ("encoder.down_blocks.0.resnets.0.norm1.
// weight", ..., 248 tensors and 83,653,863 parameters for SDXL), so a diffusers file loads by name.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <optional>
#include <string>
#include <vector>

#include "core/linear.h"
#include "io/safetensors.h"

namespace microdit {

struct Image;

// diffusers AutoencoderKL config.json fields; defaults = SDXL (stabilityai/stable-diffusion-xl-base-1.0/vae).
struct VAEConfig {
  int64_t in_channels = 3, out_channels = 3, latent_channels = 4, layers_per_block = 2,
          norm_num_groups = 32;
  std::vector<int64_t> block_out_channels{128, 256, 512, 512};
  double scaling_factor = 0.13025, shift_factor = 0.0;  // shift 0 when null
  bool mid_block_add_attention = true, use_quant_conv = true, use_post_quant_conv = true;

  static VAEConfig sdxl();
  // One-line microdit::Error naming the file and the field for a bad or unsupported value
  // (e.g. down_block_types other than DownEncoderBlock2D, act_fn other than silu).
  static VAEConfig from_json_file(const std::string& path);
  static VAEConfig from_json_text(const std::string& json, const std::string& source);
  void validate() const;
  int64_t downsample_factor() const { return int64_t{1} << (block_out_channels.size() - 1); }
  std::string summary() const;
};

// Diagonal Gaussian over latents, (B, C, h, w) each.
struct Posterior {
  at::Tensor mean, logvar;  // logvar already clamped to [-30, 20]
  // mean + exp(0.5 logvar) * eps, eps ~ N(0, 1) drawn from `gen` (the default generator when none).
  at::Tensor sample(std::optional<at::Generator> gen = std::nullopt) const;
  at::Tensor sample_with_noise(const at::Tensor& eps) const;  // mean + exp(0.5 logvar) * eps
  at::Tensor mode() const { return mean; }
};

namespace vae {

using torch::Tensor;

// GroupNorm(groups, C, eps 1e-6) -> SiLU -> conv3x3 twice, plus a 1x1 conv_shortcut when Cin != Cout.
struct ResnetBlockImpl : torch::nn::Module {
  ResnetBlockImpl(int64_t in, int64_t out, int64_t groups);
  Tensor forward(const Tensor& x);
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
};
TORCH_MODULE(ResnetBlock);

// Single-head self-attention over the H*W positions with a residual: group_norm, to_q/k/v,
// to_out.0 (Linear C->C each).
struct AttentionImpl : torch::nn::Module {
  AttentionImpl(int64_t channels, int64_t groups);
  Tensor forward(const Tensor& x);  // (B, C, H, W) -> same
  torch::nn::GroupNorm group_norm{nullptr};
  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out0{nullptr};
};
TORCH_MODULE(Attention);

// Zero pad right and bottom by one, then conv3x3 stride 2 ("downsamplers.0.conv").
struct DownsampleImpl : torch::nn::Module {
  explicit DownsampleImpl(int64_t channels);
  Tensor forward(const Tensor& x);
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Downsample);

// Nearest x2, then conv3x3 ("upsamplers.0.conv"). Without autograd it runs as the same
// function in 2.25x fewer multiply-adds: each of the four output phases (row, column parity)
// is a 2x2 conv of the small input whose taps are sums of the 3x3 taps (equal up to rounding).
struct UpsampleImpl : torch::nn::Module {
  explicit UpsampleImpl(int64_t channels);
  Tensor forward(const Tensor& x);
  Tensor forward_reference(const Tensor& x);  // interpolate, then the 3x3 conv
  torch::nn::Conv2d conv{nullptr};
  bool phase_conv = true;  // false: always forward_reference
  void build_phase_weights();  // done lazily by forward; load_vae does it up front

 private:
  Tensor phase_weight_, phase_bias_;  // (4C, C, 2, 2), (4C): cached, rebuilt when conv changes
  const void *phase_src_ = nullptr, *phase_bias_src_ = nullptr;
  int64_t phase_version_ = -1;
};
TORCH_MODULE(Upsample);

// resnets.0 -> attentions.0 (when enabled) -> resnets.1, all `channels` wide.
struct MidBlockImpl : torch::nn::Module {
  MidBlockImpl(int64_t channels, int64_t groups, bool add_attention);
  Tensor forward(const Tensor& x);
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};
};
TORCH_MODULE(MidBlock);

// DownEncoderBlock2D / UpDecoderBlock2D: `resnets` then an optional down/upsampler.
struct DownBlockImpl : torch::nn::Module {
  DownBlockImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool downsample);
  Tensor forward(Tensor x);
  torch::nn::ModuleList resnets{nullptr}, downsamplers{nullptr};
};
TORCH_MODULE(DownBlock);
struct UpBlockImpl : torch::nn::Module {
  UpBlockImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool upsample);
  Tensor forward(Tensor x);
  torch::nn::ModuleList resnets{nullptr}, upsamplers{nullptr};
};
TORCH_MODULE(UpBlock);

struct EncoderImpl : torch::nn::Module {
  explicit EncoderImpl(const VAEConfig& c);
  Tensor forward(const Tensor& x);  // (B, in, H, W) -> (B, 2 * latent, H/f, W/f)
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  MidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(Encoder);

struct DecoderImpl : torch::nn::Module {
  explicit DecoderImpl(const VAEConfig& c);
  Tensor forward(const Tensor& z);  // (B, latent, h, w) -> (B, out, h*f, w*f)
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  MidBlock mid_block{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(Decoder);

}  // namespace vae

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(VAEConfig cfg);
  // x (B, in_channels, H, W) in [-1, 1], H and W multiples of 8 (any size works; odd sizes
  // round as diffusers does) -> posterior of (B, latent, H/8, W/8) via quant_conv.
  Posterior encode(const at::Tensor& x);
  // z (B, latent, h, w) UNscaled latents -> (B, out_channels, 8h, 8w), not clamped.
  at::Tensor decode(const at::Tensor& z);
  const VAEConfig& config() const { return cfg_; }
  // The device and dtype of the weights (inputs are moved/cast to them by encode/decode).
  c10::Device device() const;
  c10::ScalarType dtype() const;
  // Keeps 4-D weights and activations in channels-last (NHWC) memory: oneDNN's convolutions
  // then need no layout reorders. Same results up to summation order.
  void set_channels_last(bool on);
  bool channels_last() const { return channels_last_; }
  // The decoder's upsamplers as four 2x2 phase convs (default) or as diffusers computes them.
  // Turning it on builds the merged weights now, so that later encode/decode calls only read
  // the module (load_vae does this: a loaded VAE may serve several threads at once).
  void set_phase_upsample(bool on);

  vae::Encoder encoder{nullptr};
  vae::Decoder decoder{nullptr};
  torch::nn::Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};

 private:
  VAEConfig cfg_;
  bool channels_last_ = false;
};
TORCH_MODULE(AutoencoderKL);

// The tensors of a VAE checkpoint renamed to diffusers names: accepts diffusers names, the old
// attention names (query/key/value/proj_attn) and the LDM/SGM naming (encoder.down.{i}.block.{j},
// mid.attn_1 with (C,C,1,1) weights, reversed decoder levels), with an optional
// `first_stage_model.` or `vae.` prefix (keys outside the prefix are dropped when it is present).
// `num_levels` = block_out_channels.size() (for the decoder's level reversal).
NamedTensors vae_state_dict_to_diffusers(const NamedTensors& tensors, int64_t num_levels);

// `path`: a diffusers folder (config.json + diffusion_pytorch_model.safetensors, or the .fp16
// variant) or a single .safetensors file (SDXL config unless a config.json sits beside it).
// fp32/fp16/bf16 tensors, converted to `dtype` on `device`. Missing/extra/mis-shaped tensor ->
// one-line microdit::Error naming the tensor and the file. The module is in eval mode.
AutoencoderKL load_vae(const std::string& path, c10::Device device,
                       c10::ScalarType dtype = at::kFloat);

// Which files load_vae would read: {weights file, config.json or "" for the SDXL default}.
std::pair<std::string, std::string> resolve_vae_files(const std::string& path);

// Latent scaling as the reference: scaled = (z - shift) * scaling_factor; unscale inverts it.
at::Tensor scale_latents(const at::Tensor& z, const VAEConfig& c);
at::Tensor unscale_latents(const at::Tensor& scaled, const VAEConfig& c);

// Decoder output (B, 3, H, W) -> B 8-bit images: clamp(x / 2 + 0.5, 0, 1) then the project's
// float -> uint8 rule (tensor_to_images).
std::vector<Image> vae_output_to_images(const at::Tensor& decoded);

// Scaled latents (as stored in shards / sampled by the DiT) -> images: unscale, decode, clamp, uint8.
std::vector<Image> decode_latents_to_images(AutoencoderKL& vae, const at::Tensor& scaled_latents);

}  // namespace microdit
