// microdit info: parameters, active parameters per token and training FLOPs of a model.
#include <fmt/format.h>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "model/config.h"
#include "model/stats.h"

namespace microdit::cli {

namespace {

struct InfoOptions {
  RuntimeOptions rt;
  std::string preset = "MicroDiT_XL_2", config;
  int latent_size = 0, channels = 0, caption_channels = 0, caption_len = 77;
  double mask_ratio = 0.75;
};

void run_info(const InfoOptions& o) {
  set_threads(o.rt.threads);
  resolve_device(o.rt.device);  // validates --device like every command
  ModelConfig c = o.config.empty() ? preset(o.preset) : config_from_yaml_file(o.config);
  if (o.latent_size) c.input_size = o.latent_size;
  if (o.channels) c.in_channels = o.channels;
  if (o.caption_channels) c.caption_channels = o.caption_channels;
  c.validate();
  MD_CHECK(o.mask_ratio >= 0 && o.mask_ratio < 1, "--mask-ratio must be in [0, 1), got {}",
           o.mask_ratio);
  MD_CHECK(o.caption_len >= 1, "--caption-len must be >= 1");
  const auto st = model_stats(c, o.mask_ratio, o.caption_len);
  const auto dense = model_stats(c, 0.0, o.caption_len);
  int moe_b = 0, moe_m = 0;
  for (const auto& b : backbone_blocks(c)) moe_b += b.moe;
  for (const auto& b : mixer_blocks(c)) moe_m += b.moe;
  const std::string name = o.config.empty() ? o.preset : o.config;
  fmt::print("model: {}\n", name);
  fmt::print("  latent {}x{}x{}, patch {} -> {} tokens; caption {} x {}\n", c.input_size,
             c.input_size, c.in_channels, c.patch_size, st.tokens, o.caption_len,
             c.caption_channels);
  fmt::print("  patch-mixer: {} blocks, width {}, {} MoE\n", c.patch_mixer_depth,
             c.patch_mixer_dim, moe_m);
  fmt::print("  backbone: {} blocks, width {}, head_dim {}, qkv ratio {}..{}, FFN ratio {}..{}, "
             "{} MoE ({} experts, capacity {})\n",
             c.depth, c.dim, c.head_dim, c.qkv_ratio[0], c.qkv_ratio[1], c.mlp_ratio[0],
             c.mlp_ratio[1], moe_b, c.num_experts, c.expert_capacity);
  fmt::print("parameters: {} ({:.3f} B)\n", st.params, st.params / 1e9);
  fmt::print("  expert weights: {}\n", st.moe_expert_params);
  fmt::print("active parameters per token: {:.0f} ({:.3f} B; each token meets capacity/E of "
             "the experts on average)\n",
             st.active_params, st.active_params / 1e9);
  fmt::print("training FLOPs per image at mask ratio {}: {:.2f} GFLOP ({} of {} tokens in the "
             "backbone; forward {:.2f} GFLOP, x3 for forward+backward)\n",
             o.mask_ratio, st.train_flops / 1e9, st.kept_tokens, st.tokens,
             st.forward_flops / 1e9);
  fmt::print("training FLOPs per image without masking: {:.2f} GFLOP ({:.2f}x the masked cost)\n",
             dense.train_flops / 1e9, dense.train_flops / st.train_flops);
}

}  // namespace

void register_info(CLI::App& app) {
  auto o = std::make_shared<InfoOptions>();
  auto* cmd = app.add_subcommand("info", "size and cost of a model configuration");
  cmd->add_option("--preset", o->preset, "MicroDiT_XL_2, MicroDiT_Tiny_2, MicroDiT_Nano_2, MicroDiT_Pico_2")
      ->capture_default_str();
  cmd->add_option("--config", o->config, "YAML model config (instead of --preset)");
  cmd->add_option("--latent-size", o->latent_size, "latent H = W (default: the preset's)");
  cmd->add_option("--channels", o->channels, "latent channels C (default: the preset's)");
  cmd->add_option("--caption-channels", o->caption_channels, "caption embedding width Cc");
  cmd->add_option("--caption-len", o->caption_len, "caption tokens L")->capture_default_str();
  cmd->add_option("--mask-ratio", o->mask_ratio, "fraction of patches dropped after the mixer")
      ->capture_default_str();
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run_info(*o); });
}

}  // namespace microdit::cli
