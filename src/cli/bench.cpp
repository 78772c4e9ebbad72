// microdit bench: training-step throughput of a preset on random data (EDM loss with
// deferred masking, backward, AdamW), for measuring, not for training.
#include <torch/cuda.h>
#include <torch/optim/adamw.h>

#include <chrono>

#include "cli/commands.h"
#include "core/autocast.h"
#include "core/device.h"
#include "core/error.h"
#include "core/precision.h"
#include "diffusion/edm.h"
#include "model/stats.h"
#include "train/fused_adamw.h"
#include "train/parallel_backward.h"

namespace microdit::cli {

namespace {

struct BenchOptions {
  RuntimeOptions rt;
  std::string preset = "MicroDiT_Pico_2";
  int batch = 8, steps = 10, warmup = 3, latent_size = 0, caption_len = 77;
  double mask_ratio = 0.75;
  bool bf16 = false;
  bool plain_adamw = false;  // torch::optim::AdamW::step instead of the fused kernel
  bool recompute = false;    // activation checkpointing per block
  bool tf32 = false;
  int workers = 0;           // CPU row-slice workers (train/parallel_backward.h); 0: one per thread
};

void sync(const c10::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

void run(const BenchOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  ModelConfig c = preset(o.preset);
  if (o.latent_size) c.input_size = o.latent_size;
  c.validate();
  MD_CHECK(o.batch >= 1 && o.steps >= 1 && o.warmup >= 0, "--batch and --steps must be >= 1");
  MicroDiT model(c);
  model->to(device);
  model->train();
  model->recompute_blocks = o.recompute;
  set_tf32(o.tf32);
  torch::optim::AdamW opt(model->parameters(),
                          torch::optim::AdamWOptions(1e-4).betas({0.9, 0.999}).eps(1e-8).weight_decay(0.1));
  auto f32 = torch::TensorOptions().device(device);
  auto x = torch::randn({o.batch, c.in_channels, c.input_size, c.input_size}, f32);
  auto y = torch::randn({o.batch, 1, o.caption_len, c.caption_channels}, f32);
  EDMConfig edm;
  const int workers = resolve_cpu_workers(o.workers, device, /*distributed=*/false);
  const auto params = model->parameters();
  auto step = [&] {
    opt.zero_grad();
    parallel_backward(params, o.batch, workers, 1.0, [&](int64_t first, int64_t n) {
      auto xs = x.narrow(0, first, n);
      AutocastGuard autocast(device.type(), o.bf16);  // the forward pass only, as in the trainer
      return edm_loss(*model, xs, y.narrow(0, first, n), draw_loss_randomness(xs, o.mask_ratio, c.patch_size),
                      edm);
    });
    if (o.plain_adamw) opt.step();
    else fused_adamw_step(opt);
  };
  for (int i = 0; i < o.warmup; ++i) step();
  sync(device);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < o.steps; ++i) step();
  sync(device);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto st = model_stats(c, o.mask_ratio, o.caption_len);
  const double ips = o.batch * o.steps / s;
  fmt::print("{}\n", runtime_summary(device));
  // Model FLOPs per second with three significant digits: TFLOP/s on a GPU, GFLOP/s on a CPU.
  const double flops = ips * st.train_flops;
  const std::string rate = device.is_cuda() ? fmt::format("{:.3g} TFLOP/s", flops / 1e12)
                                            : fmt::format("{:.3g} GFLOP/s", flops / 1e9);
  std::string split = workers > 1 ? fmt::format(", {} CPU workers", workers) : "";
  if (o.recompute) split += ", activation checkpointing";
  if (o.tf32 && device.is_cuda()) split += ", TF32";
  fmt::print("bench {} latent {} batch {} mask {} {}{}{}: {:.1f} ms/step, {:.1f} images/s, {} (model FLOPs), "
             "peak memory {}\n",
             o.preset, c.input_size, o.batch, o.mask_ratio, o.bf16 ? "bf16 autocast" : "fp32",
             o.plain_adamw ? ", plain AdamW" : "", split, 1e3 * s / o.steps, ips, rate, peak_memory_text(device));
}

}  // namespace

void register_bench(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  auto* cmd = app.add_subcommand("bench", "time training steps of a preset on random data");
  cmd->add_option("--preset", o->preset, "model preset")->capture_default_str();
  cmd->add_option("--batch", o->batch, "images per step")->capture_default_str();
  cmd->add_option("--steps", o->steps, "timed steps")->capture_default_str();
  cmd->add_option("--warmup", o->warmup, "untimed steps first")->capture_default_str();
  cmd->add_option("--latent-size", o->latent_size, "latent H = W (default: the preset's)");
  cmd->add_option("--caption-len", o->caption_len, "caption tokens")->capture_default_str();
  cmd->add_option("--mask-ratio", o->mask_ratio, "deferred-masking ratio")->capture_default_str();
  cmd->add_flag("--bf16", o->bf16, "bf16 autocast");
  cmd->add_option("--workers", o->workers,
                  "CPU: row slices of the batch run side by side, one thread each (0: one per thread, 1: off)")
      ->capture_default_str();
  cmd->add_flag("--checkpoint-activations", o->recompute,
                "recompute each block in the backward pass instead of keeping its activations");
  cmd->add_flag("--tf32", o->tf32, "TF32 for float32 matmuls on NVIDIA GPUs");
  cmd->add_flag("--plain-adamw", o->plain_adamw, "torch::optim::AdamW's step instead of the fused AdamW kernel");
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
