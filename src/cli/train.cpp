// microdit train --config FILE [section.key=value ...] [--resume]
#include <nlohmann/json.hpp>

#include <fstream>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "data/image.h"
#include "eval/sampling.h"
#include "text/encoder.h"
#include "train/trainer.h"

namespace microdit::cli {

namespace {

struct TrainOptions {
  RuntimeOptions rt;
  std::string config;
  std::vector<std::string> overrides;
  bool resume = false, print_final = false;
};

// loss.png from metrics.jsonl: training loss (smoothed) and validation loss against step.
void plot_metrics(const std::string& metrics, const std::string& png) {
  std::ifstream in(metrics);
  PlotSeries train{{}, {}, {31, 119, 180}, "training loss (EMA 0.9)"};
  PlotSeries val{{}, {}, {214, 39, 40}, "validation loss"};
  double smooth = NAN;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    if (j.contains("loss")) {
      const double l = j["loss"].get<double>();
      smooth = std::isnan(smooth) ? l : 0.9 * smooth + 0.1 * l;
      train.x.push_back(j["step"].get<double>());
      train.y.push_back(smooth);
    }
    if (j.contains("val_loss")) {
      val.x.push_back(j["step"].get<double>());
      val.y.push_back(j["val_loss"].get<double>());
    }
  }
  PlotOptions po;
  po.log_y = true;
  po.title = "MicroDiT training";
  po.x_label = "step";
  po.y_label = "EDM loss";
  write_png(png, plot_lines({train, val}, po));
}

void run(const TrainOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  auto cfg = load_train_config(o.config, o.overrides);
  if (o.print_final) {  // for scripts: where the finished run's checkpoint is (or will be)
    fmt::print("{}\n", final_checkpoint_path(cfg));
    return;
  }
  Trainer trainer(cfg, device);
  fmt::print("{}\n", runtime_summary(device));
  if (o.resume) {
    if (trainer.resume())
      fmt::print("resumed from {} at step {}\n", latest_checkpoint(cfg.out), trainer.state().step);
    else
      fmt::print("no checkpoint in {}/checkpoints: starting from step 0\n", cfg.out);
  } else {
    MD_CHECK(latest_checkpoint(cfg.out).empty(),
             "{} already holds checkpoints: pass --resume to continue, or choose another run.out",
             cfg.out);
  }
  // Fixed prompts, encoded once with the shards' encoder and caption length.
  Tensor prompt_emb;
  if (!cfg.sample_prompts.empty() && cfg.sample_every > 0) {
    auto enc = text::make_text_encoder(cfg.text_encoder, {trainer.caption_len(), c10::kCPU});
    prompt_emb = enc->encode(cfg.sample_prompts);
    MD_CHECK(prompt_emb.size(2) == cfg.model.caption_channels,
             "data.text_encoder '{}' gives {}-wide embeddings, the model takes {}", cfg.text_encoder,
             prompt_emb.size(2), cfg.model.caption_channels);
    make_dirs(cfg.out + "/samples");
  }
  trainer.on_sample = [&](MicroDiTImpl& model, int64_t step) {
    if (!prompt_emb.defined()) return;
    SamplerOptions so;
    so.steps = cfg.sample_steps;
    so.cfg = cfg.sample_cfg;
    auto images = generate_images(model, prompt_emb, cfg.sample_seed, cfg.edm, so);
    const auto cells = tensor_to_images(images, 3);
    const std::string base = fmt::format("{}/samples/step-{:07d}", cfg.out, step);
    write_png(base + ".png", make_grid(cells, std::min<int>(8, cells.size())));
    std::string txt;
    for (const auto& p : cfg.sample_prompts) txt += p + "\n";
    std::ofstream(base + ".txt") << txt;
  };
  trainer.on_finish = [&](const std::string& metrics) {
    plot_metrics(metrics, cfg.out + "/loss.png");
    fmt::print("checkpoint: {}\nloss curve: {}/loss.png\n", latest_checkpoint(cfg.out), cfg.out);
    if (prompt_emb.defined()) fmt::print("samples: {}/samples/\n", cfg.out);
  };
  trainer.run();
}

}  // namespace

void register_train(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand("train", "train MicroDiT on prepared shards");
  cmd->add_option("--config", o->config, "training YAML (see configs/)")->required();
  cmd->add_option("overrides", o->overrides, "section.key=value overrides, e.g. train.steps=100");
  cmd->add_flag("--resume", o->resume, "continue from the newest checkpoint in run.out");
  cmd->add_flag("--print-final-checkpoint", o->print_final, "print the finished run's checkpoint path and exit");
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
