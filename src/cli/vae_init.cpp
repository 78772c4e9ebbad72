// microdit vae init: a VAE with random weights in the diffusers layout, for trying the latent
// path end to end without downloading anything (tests, the CI's end-to-end run). The weights
// are PyTorch's default initialisation from a seed: they encode and decode, but to noise.
#include <torch/utils.h>

#include "cli/commands.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "vae/autoencoder_kl.h"

namespace microdit::cli {

namespace {

struct VaeInitOptions {
  std::string config, out;
  uint64_t seed = 0;
};

void run_init(const VaeInitOptions& o) {
  const VAEConfig cfg = o.config.empty() ? VAEConfig::sdxl() : VAEConfig::from_json_file(o.config);
  torch::manual_seed(o.seed);
  AutoencoderKL vae(cfg);
  int64_t params = 0;
  for (const auto& p : vae->parameters()) params += p.numel();
  write_safetensors(o.out, state_dict(*vae), {{"format", "pt"}, {"microdit", "random VAE weights"}});
  fmt::print("wrote {}: random AutoencoderKL ({}), {} parameters, seed {}\n", o.out,
             o.config.empty() ? "SDXL config" : o.config, params, o.seed);
}

}  // namespace

void register_vae_init(CLI::App& vae) {
  auto o = std::make_shared<VaeInitOptions>();
  auto* cmd = vae.add_subcommand("init", "write a VAE with random weights (for tests and dry runs)");
  cmd->add_option("--config", o->config, "diffusers config.json (default: SDXL's)");
  cmd->add_option("--seed", o->seed, "initialisation seed")->capture_default_str();
  cmd->add_option("--out", o->out, "output .safetensors")->required();
  cmd->callback([o] { run_init(*o); });
}

}  // namespace microdit::cli
