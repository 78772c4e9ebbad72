// microdit sample --ckpt FILE --prompt "..." [--prompts FILE] --steps N --cfg W --seed S --out F.png
#include <fstream>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/progress.h"
#include "data/image.h"
#include "eval/sampling.h"
#include "io/checkpoint.h"
#include "text/encoder.h"

namespace microdit::cli {

namespace {

struct SampleOptions {
  RuntimeOptions rt;
  std::string ckpt, prompts_file, out = "samples.png", solver = "heun", encoder;
  std::vector<std::string> prompts;
  int steps = 30, per_prompt = 4, batch = 16, scale = 4;
  double cfg = 4.0;
  uint64_t seed = 0;
  bool no_ema = false;
};

void run(const SampleOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
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

  auto sm = load_sampling_model(o.ckpt, device, o.no_ema);
  const auto& cfg = sm.model->config();
  MD_CHECK(cfg.in_channels == 3,
           "{}: a {}-channel latent model needs a VAE decoder to make pictures (not available yet)",
           o.ckpt, cfg.in_channels);
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
  fmt::print("{}\nsampling {} image(s): {} steps ({}), guidance {}, seed {}, {} weights\n",
             runtime_summary(device), rows.size(), o.steps, o.solver, o.cfg, o.seed,
             sm.ema ? "EMA" : "raw");
  ProgressBar bar("sample", static_cast<int64_t>(rows.size()), "img");
  auto images = generate_images(*model, emb, o.seed, edm, so, o.batch,
                                [&](int64_t done) { bar.update(done); });
  bar.finish();
  write_png(o.out, make_grid(tensor_to_images(images, o.scale), o.per_prompt));
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
  cmd->add_option("--out", o->out, "output grid PNG")->capture_default_str();
  cmd->add_option("--scale", o->scale, "enlarge each image this many times in the grid")->capture_default_str();
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
