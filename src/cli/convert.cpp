// microdit convert: load a checkpoint (reference torch.save .pt or safetensors) into a model
// of the given configuration, strictly by name, and save it as safetensors.
#include <fmt/format.h>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "model/microdit.h"

namespace microdit::cli {

namespace {

struct ConvertOptions {
  RuntimeOptions rt;
  std::string ckpt, out, preset = "MicroDiT_XL_2", config;
  int latent_size = 0, channels = 0, caption_channels = 0;
  double pos_interp_scale = 0;
  LoadOptions load;
};

void run(const ConvertOptions& o) {
  set_threads(o.rt.threads);
  ModelConfig c = o.config.empty() ? preset(o.preset) : config_from_yaml_file(o.config);
  if (o.latent_size) c.input_size = o.latent_size;
  if (o.channels) c.in_channels = o.channels;
  if (o.caption_channels) c.caption_channels = o.caption_channels;
  if (o.pos_interp_scale > 0) c.pos_interp_scale = o.pos_interp_scale;
  c.validate();
  fmt::print("reading {}\n", o.ckpt);
  auto tensors = read_checkpoint(o.ckpt);
  MicroDiT model(c);
  auto rep = load_state_dict(*model, tensors, o.load, o.ckpt);
  for (const auto& k : rep.missing) fmt::print("  missing (allowed, kept at init): {}\n", k);
  for (const auto& k : rep.unexpected) fmt::print("  unexpected (allowed, ignored): {}\n", k);
  write_safetensors(o.out, state_dict(*model), {{"microdit_config", config_to_yaml(c)}});
  fmt::print("wrote {} tensors to {}\n", rep.loaded, o.out);
}

}  // namespace

void register_convert(CLI::App& app) {
  auto o = std::make_shared<ConvertOptions>();
  auto* cmd = app.add_subcommand("convert", "load a checkpoint by name and save it as safetensors");
  cmd->add_option("--ckpt", o->ckpt, "torch.save (.pt) or safetensors checkpoint")->required();
  cmd->add_option("--out", o->out, "output .safetensors")->required();
  cmd->add_option("--preset", o->preset, "model preset")->capture_default_str();
  cmd->add_option("--config", o->config, "YAML model config (instead of --preset)");
  cmd->add_option("--latent-size", o->latent_size, "latent H = W");
  cmd->add_option("--channels", o->channels, "latent channels C");
  cmd->add_option("--caption-channels", o->caption_channels, "caption embedding width Cc");
  cmd->add_option("--pos-interp-scale", o->pos_interp_scale, "positional interpolation scale");
  cmd->add_option("--allow-missing", o->load.allow_missing, "key pattern that may be missing ('*' wildcard)");
  cmd->add_option("--allow-unexpected", o->load.allow_unexpected, "key pattern that may be extra");
  cmd->add_flag("--non-strict", o->load.non_strict, "allow any missing or extra key");
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
