// microdit sample --ckpt FILE --prompt "..." [--prompts FILE] --steps N --cfg W --seed S --out F.png
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <fstream>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/precision.h"
#include "core/progress.h"
#include "data/image.h"
#include "eval/sampling.h"
#include "eval/sampling_limits.h"
#include "io/checkpoint.h"
#include "text/encoder.h"
#include "vae/autoencoder_kl.h"

namespace microdit::cli {

namespace {

struct SampleOptions {
  RuntimeOptions rt;
  std::string ckpt, prompts_file, out = "samples.png", solver = "heun", encoder, precision = "auto";
  std::vector<std::string> prompts;
  int steps = 30, per_prompt = 4, batch = 16, scale = 4;
  double cfg = 4.0;
  uint64_t seed = 0;
  bool no_ema = false, bf16 = false, cuda_graph = false;
  std::string vae;
  bool scale_given = false;  // latent models default to --scale 1 (their pictures are large)
};

void run(const SampleOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  MD_CHECK(!o.bf16 || o.precision == "auto" || o.precision == "bf16", "--bf16 and --precision {} disagree",
           o.precision);
  const bool bf16 = o.bf16 || sampling_bf16(o.precision, device.is_cuda());
  std::vector<std::string> prompts = o.prompts;
  if (!o.prompts_file.empty()) {
    std::ifstream in(o.prompts_file);
    MD_CHECK(in.good(), "{}: cannot open the prompt file", o.prompts_file);
    std::string line;
    while (std::getline(in, line))
      if (line.find_first_not_of(" \t\r") != std::string::npos) prompts.push_back(line);
    MD_CHECK(!prompts.empty() || !o.prompts.empty(), "{}: the prompt file is empty", o.prompts_file);
  }
  MD_CHECK(!prompts.empty(), "give at least one --prompt or a --prompts file");
  MD_CHECK(o.per_prompt >= 1 && o.steps >= 1 && o.scale >= 1, "--n, --steps and --scale must be >= 1");
  MD_CHECK(!o.cuda_graph || device.is_cuda(), "--cuda-graph needs --device cuda");
  check_sampling_values(o.per_prompt, o.steps, o.cfg, o.seed);  // eval/sampling_limits.h
  check_prompts(prompts, o.per_prompt);
  MD_CHECK(o.scale <= SamplingLimits::kMaxScale && o.batch >= 1, "--scale must be in [1, {}] and --batch >= 1",
           SamplingLimits::kMaxScale);

  auto sm = load_sampling_model(o.ckpt, device, o.no_ema);
  const auto& cfg = sm.model->config();
  MD_CHECK(!sm.is_latent() || !o.vae.empty(),
           "{}: a latent model ({} channels, VAE latents x {}) needs --vae W to make pictures{}", o.ckpt,
           cfg.in_channels, sm.latent_scale, sm.vae_hint.empty() ? "" : " (it was trained with " + sm.vae_hint + ")");
  MD_CHECK(sm.is_latent() || cfg.in_channels == 3,
           "{}: a {}-channel model without latent metadata cannot be turned into pictures", o.ckpt,
           cfg.in_channels);
  AutoencoderKL vae{nullptr};
  if (sm.is_latent()) {
    vae = load_vae(o.vae, device, device.is_cuda() ? at::kBFloat16 : at::kFloat);
    MD_CHECK(vae->config().latent_channels == cfg.in_channels,
             "{}: the VAE has {} latent channels, the model {}", o.vae, vae->config().latent_channels,
             cfg.in_channels);
    if (std::abs(vae->config().scaling_factor - sm.latent_scale) > 1e-9)
      fmt::print("note: the VAE's scaling factor {} differs from the training latents' {}; using {}\n",
                 vae->config().scaling_factor, sm.latent_scale, sm.latent_scale);
  }
  const std::string enc_name = o.encoder.empty() ? sm.text_encoder : o.encoder;
  auto& model = sm.model;
  const auto& edm = sm.edm;
  const int64_t L = sm.caption_len;
  auto enc = text::make_text_encoder(enc_name, {L, c10::kCPU});
  std::vector<std::string> rows;
  for (const auto& p : prompts)
    for (int i = 0; i < o.per_prompt; ++i) rows.push_back(p);
  auto emb = enc->encode(rows);  // (N, L, W)
  MD_CHECK(emb.size(2) == cfg.caption_channels, "encoder '{}' gives {}-wide embeddings, the model takes {}",
           enc_name, emb.size(2), cfg.caption_channels);
  SamplerOptions so;
  so.steps = o.steps;
  so.cfg = o.cfg;
  so.solver = parse_solver(o.solver);
  so.cuda_graph = o.cuda_graph;
  so.bf16 = bf16;
  fmt::print("{}\nsampling {} image(s): {} steps ({}), guidance {}, seed {}, {} weights, {}\n",
             runtime_summary(device), rows.size(), o.steps, o.solver, o.cfg, o.seed,
             sm.ema ? "EMA" : "raw", sampling_precision_text(bf16, device.is_cuda()));
  ProgressBar bar("sample", static_cast<int64_t>(rows.size()), "img");
  const Tensor images = generate_images(*model, emb, o.seed, edm, so, o.batch, [&](int64_t done) { bar.update(done); });
  bar.finish();
  std::vector<Image> pictures;
  if (sm.is_latent()) {  // as the reference's generate: z / scale -> decode -> clamp -> uint8
    torch::NoGradGuard ng;
    ProgressBar dbar("decode", images.size(0), "img");
    for (int64_t s = 0; s < images.size(0); s += o.batch) {
      const int64_t n = std::min<int64_t>(o.batch, images.size(0) - s);
      auto z = images.narrow(0, s, n).to(device) / sm.latent_scale;  // (n, C, h, w) unscaled
      auto px = vae->decode(z).to(at::kCPU, at::kFloat);               // (n, 3, 8h, 8w)
      for (auto& im : vae_output_to_images(px)) pictures.push_back(o.scale_given && o.scale > 1 ? resize(im, im.width * o.scale, im.height * o.scale) : im);
      dbar.update(s + n);
    }
    dbar.finish();
  } else {
    pictures = tensor_to_images(images, o.scale);
  }
  write_png(o.out, make_grid(pictures, o.per_prompt));
  std::string txt;
  for (const auto& p : prompts) txt += p + "\n";
  std::ofstream(o.out + ".txt") << txt;
  fmt::print("wrote {} (one row per prompt) and {}.txt\n", o.out, o.out);
}

}  // namespace

void register_sample(CLI::App& app) {
  auto o = std::make_shared<SampleOptions>();
  auto* cmd = app.add_subcommand("sample", "generate images from text with a trained checkpoint");
  cmd->add_option("--ckpt", o->ckpt, "training checkpoint (.safetensors)")->required();
  cmd->add_option("--prompt", o->prompts, "a prompt (repeatable)");
  cmd->add_option("--prompts", o->prompts_file, "a file with one prompt per line");
  cmd->add_option("--n", o->per_prompt, "images per prompt")->capture_default_str();
  cmd->add_option("--steps", o->steps, "sampler steps")->capture_default_str();
  cmd->add_option("--cfg", o->cfg, "classifier-free guidance scale (1: off)")->capture_default_str();
  cmd->add_option("--seed", o->seed, "noise seed")->capture_default_str();
  cmd->add_option("--solver", o->solver, "heun or euler")->capture_default_str();
  cmd->add_option("--batch", o->batch, "images per network batch")->capture_default_str();
  cmd->add_option("--encoder", o->encoder, "override the checkpoint's text encoder");
  cmd->add_flag("--no-ema", o->no_ema, "use the raw weights instead of the EMA");
  cmd->add_flag("--cuda-graph", o->cuda_graph,
                "on a GPU: record one network evaluation into a CUDA graph and replay it (fewer launches)");
  add_precision_option(*cmd, o->precision);
  cmd->add_flag("--bf16", o->bf16, "the same as --precision bf16");
  cmd->add_option("--vae", o->vae,
                  "latent models: VAE (diffusers folder or .safetensors) that decodes the samples");
  cmd->add_option("--out", o->out, "output grid PNG")->capture_default_str();
  cmd->add_option("--scale", o->scale, "enlarge each image this many times in the grid")->capture_default_str();
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o, cmd] {
    o->scale_given = cmd->get_option("--scale")->count() > 0;
    run(*o);
  });
}

}  // namespace microdit::cli
