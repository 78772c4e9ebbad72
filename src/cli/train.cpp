// microdit train --config FILE [section.key=value ...] [--resume]
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <c10/util/Exception.h>

#include <cstdio>
#include <fstream>
#include <thread>

#include "cli/commands.h"
#include "vae/autoencoder_kl.h"
#include "core/cpu_allocations.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "data/image.h"
#include "dist/dist.h"
#include "dist/launch.h"
#include "eval/sampling.h"
#include "text/encoder.h"
#include "train/trainer.h"

namespace microdit::cli {

namespace {

struct TrainOptions {
  RuntimeOptions rt;
  std::string config;
  std::vector<std::string> overrides;
  bool resume = false, print_final = false, print_changed = false;
  int nproc = 0;              // > 0: start this many local workers
  int dist_timeout = 1800;    // seconds a collective may wait for a peer
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

void run_rank(const TrainOptions& o, const dist::Env& env);

void run(const TrainOptions& o) {
  if (o.nproc > 0 && !o.print_final && !o.print_changed) {  // the launcher: workers are this program without --nproc
    MD_CHECK(std::getenv("RANK") == nullptr, "--nproc cannot be used inside a launched job (RANK is set)");
    load_train_config(o.config, o.overrides);  // a bad config fails once, here
    const int cores = static_cast<int>(std::thread::hardware_concurrency());
    dist::launch_local(o.nproc, dist::own_args_without_nproc(),
                       o.rt.threads > 0 ? 0 : std::max(1, cores / o.nproc));
    return;
  }
  const auto env = dist::env_from_environment();
  if (!env.distributed()) return run_rank(o, env);
  if (env.rank != 0) std::freopen("/dev/null", "w", stdout);  // other ranks report errors only
  try {
    run_rank(o, env);
  } catch (const Error& e) {
    throw Error(fmt::format("rank {}: {}", env.rank, e.what()));
  } catch (const c10::Error& e) {  // a peer died or timed out inside a collective
    const std::string msg = e.what_without_backtrace();
    throw Error(fmt::format("rank {}: {}", env.rank, msg.substr(0, msg.find('\n'))));
  } catch (const std::exception& e) {
    throw Error(fmt::format("rank {}: {}", env.rank, e.what()));
  }
}

void run_rank(const TrainOptions& o, const dist::Env& env) {
  set_threads(o.rt.threads);
  const auto device = dist::rank_device(env, resolve_device(o.rt.device));
  if (device.is_cpu()) track_cpu_allocations();  // peak memory as the bytes of live tensors
  auto cfg = load_train_config(o.config, o.overrides);
  const std::string bf16_choice = resolve_bf16(cfg, device.is_cuda());  // before settings are compared
  if (o.print_final) {  // for scripts: where the finished run's checkpoint is (or will be)
    fmt::print("{}\n", final_checkpoint_path(cfg));
    return;
  }
  if (o.print_changed) {  // for scripts: was the run in run.out trained under these settings?
    fmt::print("{}\n", fmt::join(settings_changed_since_checkpoint(cfg), ","));
    return;
  }
  std::unique_ptr<dist::Comm> comm;
  if (env.distributed()) comm = dist::Comm::connect(env, device, std::chrono::seconds(o.dist_timeout));
  Trainer trainer(cfg, device, comm.get());
  fmt::print("{}\n", runtime_summary(device));
  if (!bf16_choice.empty()) fmt::print("{}\n", bf16_choice);
  if (auto s = trainer.parallel_summary(); !s.empty()) fmt::print("{}\n", s);
  if (auto s = trainer.precision_summary(); !s.empty()) fmt::print("{}\n", s);
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
  AutoencoderKL sample_vae{nullptr};  // loaded on first use
  if (cfg.model.in_channels != 3 && cfg.vae.empty() && cfg.sample_every > 0 && !cfg.sample_prompts.empty())
    fmt::print("note: run.vae is not set, so this latent model's sample grids are skipped\n");
  trainer.on_sample = [&](MicroDiTImpl& model, int64_t step) {
    if (!prompt_emb.defined()) return;
    SamplerOptions so;
    so.steps = cfg.sample_steps;
    so.cfg = cfg.sample_cfg;
    so.bf16 = cfg.bf16;  // the grids in the run's precision (train.bf16), as the reference's
    auto images = generate_images(model, prompt_emb, cfg.sample_seed, cfg.edm, so);
    std::vector<Image> cells;
    if (model.config().in_channels != 3) {  // a latent model: pictures need the VAE decoder
      if (cfg.vae.empty()) return;          // (run.vae unset: no sample grids, said at start)
      if (!sample_vae) sample_vae = load_vae(cfg.vae, device, device.is_cuda() ? at::kBFloat16 : at::kFloat);
      cells = decode_latents_to_images(sample_vae, images.to(device));
    } else {
      cells = tensor_to_images(images, 3);
    }
    const std::string base = fmt::format("{}/samples/step-{:07d}", cfg.out, step);
    write_png(base + ".png", make_grid(cells, std::min<int>(8, cells.size())));
    std::string txt;
    for (const auto& p : cfg.sample_prompts) txt += p + "\n";
    std::ofstream(base + ".txt") << txt;
  };
  trainer.on_finish = [&](const std::string& metrics) {
    plot_metrics(metrics, cfg.out + "/loss.png");
    fmt::print("checkpoint: {}\nloss curve: {}/loss.png\npeak memory: {}\n", latest_checkpoint(cfg.out),
               cfg.out, peak_memory_text(device));
    if (prompt_emb.defined()) fmt::print("samples: {}/samples/\n", cfg.out);
  };
  trainer.run();
  if (comm) comm->shutdown();
}

}  // namespace

void register_train(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand("train", "train MicroDiT on prepared shards");
  cmd->add_option("--config", o->config, "training YAML (see configs/)")->required();
  cmd->add_option("overrides", o->overrides, "section.key=value overrides, e.g. train.steps=100");
  cmd->add_flag("--resume", o->resume, "continue from the newest checkpoint in run.out");
  cmd->add_flag("--print-final-checkpoint", o->print_final, "print the finished run's checkpoint path and exit");
  cmd->add_flag("--print-changed-settings", o->print_changed,
                "print the settings (comma-separated) that differ from those of run.out's newest "
                "checkpoint, or an empty line, and exit");
  cmd->add_option("--nproc", o->nproc,
                  "start N local data-parallel workers (as torchrun --nproc-per-node N would)");
  cmd->add_option("--dist-timeout", o->dist_timeout,
                  "seconds a data-parallel collective waits for a peer before the job fails")
      ->capture_default_str();
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
