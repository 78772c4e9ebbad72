// microdit bench: training-step throughput of a preset on random data (EDM loss with
// deferred masking, backward, AdamW), or with --sample the sampler's images/s on a randomly
// initialised model; for measuring, not for training.
#include <torch/cuda.h>
#include <torch/optim/adamw.h>

#include <ATen/Context.h>

#include <chrono>
#include <optional>

#include "cli/commands.h"
#include "core/autocast.h"
#include "core/cpu_matmul.h"
#include "core/cpu_allocations.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/kernel_profile.h"
#include "core/precision.h"
#include "diffusion/edm.h"
#include "eval/sampling.h"
#include "kernels/fused.h"
#include "model/attention.h"
#include "model/ffn.h"
#include "model/layers.h"
#include "model/masking.h"
#include "model/stats.h"
#include "core/cuda_graph.h"
#include "train/bf16_weights.h"
#include "train/fused_adamw.h"
#include "train/parallel_backward.h"

namespace microdit::cli {

// ", fused kernels" / ", no fused kernels" for a CUDA line (kernels/fused.h).
static std::string fused_kernels_text(const c10::Device& device) {
  if (device.is_cuda() && !kernels::available()) return ", no fused kernels (built without nvcc)";
  if (!fused_kernels_enabled()) return ", fused kernels off";
  if (device.is_cuda()) return kernels::warp_row_kernels() ? ", fused kernels" : ", fused kernels (block rows)";
  return fmt::format(", fused kernels ({})", kernels::cpu::instruction_set());
}

// ", bf16 AMX attention" / ", float32 attention" ... for a CPU line (model/attention.h), and
// under bf16 autocast who multiplies under bf16 autocast: microdit's AVX512-BF16 products (core/cpu_matmul.h)
// or autocast's casts and oneDNN.
static std::string cpu_kernels_text(const c10::Device& device, bool bf16, int head_dim) {
  if (device.is_cuda()) return "";
  AutocastGuard autocast(c10::kCPU, bf16);
  const char* products = !bf16 ? "" : own_bf16_products() ? ", AVX512-BF16 products" : ", oneDNN bf16 products";
  return fmt::format("{}, {} attention", products, cpu_attention_kernel_name(cpu_attention_kernel(head_dim)));
}

// How the expert layers move tokens on this device (model/ffn.h) when training (grad) or
// sampling, where it is not the index dispatch (the CPU's when training).
static std::string moe_text(const c10::Device& device, bool grad) {
  switch (moe_dispatch_on(device.type(), grad)) {
    case MoeDispatch::gemm: return ", MoE by one-hot products";
    case MoeDispatch::gather: return ", MoE by gathers";
    default: return "";
  }
}

namespace {

struct BenchOptions {
  RuntimeOptions rt;
  std::string preset = "MicroDiT_Pico_2";
  int batch = 8, steps = 10, warmup = 3, latent_size = 0, caption_len = 77;
  int in_channels = 0, patch_size = 0, caption_channels = 0;  // 0: the preset's
  double mask_ratio = 0.75;
  bool bf16 = false;
  bool plain_adamw = false;  // torch::optim::AdamW::step instead of the fused kernel
  bool recompute = false;    // activation checkpointing per block
  bool tf32 = false;
  bool low_precision_layernorm = false;
  bool cuda_graph = false;   // record the step once into a CUDA graph, then replay it
  int profile = 0;           // steps (sampling runs) under the profiler after timing
  int profile_rows = 30;     // rows of each --profile table
  std::string profile_json;  // also every profiled name and call site to this file (tools/compare_profiles.py)
  bool memory = false;       // one more step that prints where the memory goes
  std::string sdpa;          // only this scaled-dot-product-attention backend (empty: ATen's choice)
  int workers = 0;           // CPU row-slice workers (train/parallel_backward.h); 0: one per thread
  std::string bf16_weights = "auto";  // bf16 weight copies kept by the optimizer (train/bf16_weights.h)
  // --sample: the sampler instead of training steps
  bool sample = false;
  int n = 32, sampler_steps = 30;
  double cfg = 4.0;
};

void sync(const c10::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

ModelConfig bench_config(const BenchOptions& o) {
  ModelConfig c = preset(o.preset);
  if (o.latent_size) c.input_size = o.latent_size;
  if (o.in_channels) c.in_channels = o.in_channels;
  if (o.patch_size) c.patch_size = o.patch_size;
  if (o.caption_channels) c.caption_channels = o.caption_channels;
  c.validate();
  return c;
}

// Images/s of generate_images (the `sample` command's sampler) on random captions.
void run_sample(const BenchOptions& o, const c10::Device& device) {
  const ModelConfig c = bench_config(o);
  MD_CHECK(o.n >= 1 && o.batch >= 1 && o.sampler_steps >= 1, "--n, --batch and --sampler-steps must be >= 1");
  MD_CHECK(!o.cuda_graph || device.is_cuda(), "--cuda-graph needs --device cuda");
  MD_CHECK(!o.memory, "--memory reports a training step: drop it with --sample");
  torch::manual_seed(0);
  MicroDiT model(c);
  model->to(device);
  model->eval();
  set_low_precision_layernorm(*model, o.low_precision_layernorm);
  auto captions = torch::randn({o.n, o.caption_len, c.caption_channels});
  EDMConfig edm;
  SamplerOptions so;
  so.steps = o.sampler_steps;
  so.cfg = o.cfg;
  so.cuda_graph = o.cuda_graph;
  AutocastGuard autocast(device.type(), o.bf16);
  {  // warm-up: one batch through a 2-step sampler
    SamplerOptions warm = so;
    warm.steps = 2;
    generate_images(*model, captions.narrow(0, 0, std::min(o.batch, o.n)), 0, edm, warm, o.batch);
  }
  sync(device);
  const auto t0 = std::chrono::steady_clock::now();
  generate_images(*model, captions, 0, edm, so, o.batch);
  sync(device);
  const double s = seconds_since(t0);
  fmt::print("{}\n", runtime_summary(device));
  fmt::print("bench sample {} latent {}x{}x{} patch {} n {} batch {} Heun {} cfg {} {}{}{}{}: {:.2f} images/s, "
             "{:.2f} s, peak memory {}\n",
             o.preset, c.in_channels, c.input_size, c.input_size, c.patch_size, o.n, o.batch, o.sampler_steps,
             o.cfg, o.bf16 ? bf16_autocast_text(device.is_cuda()) : "fp32", o.cuda_graph ? ", CUDA graph" : "",
             !device.is_cuda() && !o.bf16 ? fmt::format(", {} matmuls", cpu_matmul_name(cpu_fp32_matmul())) : "",
             std::string(o.low_precision_layernorm ? ", low-precision LayerNorm" : "") +
                 cpu_kernels_text(device, o.bf16, c.head_dim) + fused_kernels_text(device) +
                 moe_text(device, /*grad=*/false),
             o.n / s, s,
             peak_memory_text(device));
  if (o.profile > 0) {
    fmt::print("{} over {} more sampling run(s):\n{}", device.is_cuda() ? "GPU activity" : "CPU operators", o.profile,
               profile_ops(device, [&] {
                 for (int i = 0; i < o.profile; ++i) generate_images(*model, captions, 0, edm, so, o.batch);
                 sync(device);
               }, o.profile_rows, o.profile_json, o.profile));
  }
}

void run_train(const BenchOptions& o, const c10::Device& device) {
  const ModelConfig c = bench_config(o);
  MD_CHECK(o.batch >= 1 && o.steps >= 1 && o.warmup >= 0, "--batch and --steps must be >= 1");
  MD_CHECK(!o.cuda_graph || device.is_cuda(), "--cuda-graph needs --device cuda");
  MD_CHECK(!o.cuda_graph || !o.plain_adamw, "--cuda-graph needs the fused AdamW (drop --plain-adamw)");
  MD_CHECK(!o.cuda_graph || o.warmup >= 1, "--cuda-graph needs --warmup >= 1");
  MicroDiT model(c);
  model->to(device);
  model->train();
  model->recompute_blocks = o.recompute;
  set_low_precision_layernorm(*model, o.low_precision_layernorm);
  set_tf32(o.tf32);
  torch::optim::AdamW opt(model->parameters(),
                          torch::optim::AdamWOptions(1e-4).betas({0.9, 0.999}).eps(1e-8).weight_decay(0.1));
  auto f32 = torch::TensorOptions().device(device);
  auto x = torch::randn({o.batch, c.in_channels, c.input_size, c.input_size}, f32);
  auto y = torch::randn({o.batch, 1, o.caption_len, c.caption_channels}, f32);
  // The step's randomness lives in tensors that stay put, refilled before each step (as the
  // trainer copies its draws in), so a CUDA graph of the step reads each step's new values.
  auto rnd_normal = torch::empty({o.batch, 1, 1, 1}, f32);
  auto noise = torch::empty_like(x);
  auto mask_noise = torch::empty({o.batch, c.num_tokens()}, f32);
  auto draw = [&] {
    rnd_normal.normal_();
    noise.normal_();
    mask_noise.uniform_();
  };
  EDMConfig edm;
  const int workers = resolve_cpu_workers(o.workers, device, /*distributed=*/false);
  const auto params = model->parameters();
  std::unique_ptr<Bf16Weights> copies;
  if (use_bf16_weights(parse_bf16_weights("--bf16-weights", o.bf16_weights), device, o.bf16, !o.plain_adamw,
                       /*sharded=*/false, "--bf16-weights"))
    copies = std::make_unique<Bf16Weights>(*model);
  const auto targets = copies ? copies->grad_targets(params) : params;
  AdamWDeviceScalars dev{torch::zeros({}, f32), torch::full({}, 1e-4, f32)};
  // Where the memory goes, read in one untimed step (outside any CUDA graph): bytes alive at
  // the step's start, after the forward pass (with one worker: its saved activations), and
  // the peak over forward and backward.
  struct StepMemory {
    bool measure = false;
    int64_t start = 0, after_forward = -1, peak = 0;
  } mem;
  auto step = [&] {
    opt.zero_grad();
    if (mem.measure) {
      sync(device);
      mem.start = allocated_bytes(device);
      reset_peak_memory(device);
    }
    std::optional<Bf16Weights::Bound> bound;  // the modules use the copies for forward and backward
    if (copies) bound.emplace(*copies);
    parallel_backward(targets, o.batch, workers, 1.0, [&](int64_t first, int64_t n) {
      LossDraws d;
      d.rnd_normal = rnd_normal.narrow(0, first, n);
      d.noise = noise.narrow(0, first, n);
      if (o.mask_ratio > 0) d.mask = mask_from_noise(mask_noise.narrow(0, first, n), c.kept_tokens(o.mask_ratio));
      AutocastGuard autocast(device.type(), o.bf16);  // the forward pass only, as in the trainer
      auto loss = edm_loss(*model, x.narrow(0, first, n), y.narrow(0, first, n), d, edm);
      if (mem.measure && workers <= 1) mem.after_forward = allocated_bytes(device);
      return loss;
    }, copies ? &params : nullptr);
    bound.reset();
    if (mem.measure) {
      sync(device);
      mem.peak = peak_memory_bytes(device);
    }
    if (o.plain_adamw) opt.step();
    else fused_adamw_step(opt, o.cuda_graph ? &dev : nullptr, copies.get());
  };
  std::unique_ptr<CudaGraphStep> graph;
  if (o.cuda_graph) graph = std::make_unique<CudaGraphStep>(device, step, o.warmup);
  auto one_step = [&] {
    draw();
    if (graph) graph->run();
    else step();
  };
  // With --cuda-graph the last untimed step records the graph (and replays it).
  const auto t_warm = std::chrono::steady_clock::now();
  for (int i = 0; i < o.warmup + (graph ? 1 : 0); ++i) one_step();
  sync(device);
  const double warm_s = seconds_since(t_warm);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < o.steps; ++i) one_step();
  sync(device);
  const double s = seconds_since(t0);
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
  if (graph) split += ", CUDA graph";
  if (o.low_precision_layernorm) split += ", low-precision LayerNorm";
  if (copies) split += ", bf16 weight copies";
  if (!o.sdpa.empty()) split += ", SDPA " + o.sdpa;
  if (!device.is_cuda() && !o.bf16) split += fmt::format(", {} matmuls", cpu_matmul_name(cpu_fp32_matmul()));
  split += cpu_kernels_text(device, o.bf16, c.head_dim) + fused_kernels_text(device) + moe_text(device, /*grad=*/true);
  if (recompute_ffn() == RecomputeFfn::always || (recompute_ffn() == RecomputeFfn::cuda && device.is_cuda()))
    split += ", FFN activations recomputed";
  fmt::print("bench {} latent {} batch {} mask {} {}{}{}: {:.1f} ms/step, {:.1f} images/s, {} (model FLOPs), "
             "peak memory {}, {:.1f} s before the timed steps\n",
             o.preset, c.input_size, o.batch, o.mask_ratio, o.bf16 ? bf16_autocast_text(device.is_cuda()) : "fp32",
             o.plain_adamw ? ", plain AdamW" : "", split, 1e3 * s / o.steps, ips, rate, peak_memory_text(device),
             warm_s);
  if (o.profile > 0) {
    fmt::print("{} over {} more steps:\n{}", device.is_cuda() ? "GPU activity" : "CPU operators", o.profile, profile_ops(device, [&] {
                 for (int i = 0; i < o.profile; ++i) one_step();
                 sync(device);
               }, o.profile_rows, o.profile_json, o.profile));
  }
  if (o.memory) {  // one more step, last and plain (no CUDA graph), with the optimizer's state in place
    mem.measure = true;
    draw();
    step();
    sync(device);
    constexpr double GiB = 1LL << 30;
    fmt::print("memory of one step: {:.4g} GiB at its start (parameters, optimizer state, inputs), ", mem.start / GiB);
    if (mem.after_forward >= 0)
      fmt::print("+{:.4g} GiB kept by the forward pass (activations), ", (mem.after_forward - mem.start) / GiB);
    fmt::print("peak {:.4g} GiB in forward + backward ({:.4g} GiB per image above the start)\n", mem.peak / GiB,
               (mem.peak - mem.start) / GiB / o.batch);
  }
}

// Leaves only one SDPA backend enabled, to compare them (ATen otherwise picks by priority).
void only_sdpa_backend(const std::string& name) {
  if (name.empty()) return;
  MD_CHECK(name == "flash" || name == "cudnn" || name == "efficient" || name == "math",
           "--sdpa must be flash, cudnn, efficient or math, got '{}'", name);
  auto& ctx = at::globalContext();
  ctx.setSDPUseFlash(name == "flash");
  ctx.setSDPUseCuDNN(name == "cudnn");
  ctx.setSDPUseMemEfficient(name == "efficient");
  ctx.setSDPUseMath(name == "math");
}

void run(const BenchOptions& o) {
  // Checked before anything is timed, so that a typo does not cost the timed run.
  MD_CHECK(o.profile >= 0, "--profile must be >= 0, got {}", o.profile);
  MD_CHECK(o.profile_rows >= 1, "--profile-rows must be >= 1, got {}", o.profile_rows);
  MD_CHECK(o.profile_json.empty() || o.profile > 0, "--profile-json needs --profile N (N >= 1)");
  if (!o.profile_json.empty()) {
    const auto slash = o.profile_json.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : o.profile_json.substr(0, std::max<size_t>(slash, 1));
    MD_CHECK(is_directory(dir), "--profile-json {}: no such folder {}", o.profile_json, dir);
  }
  set_threads(o.rt.threads);
  only_sdpa_backend(o.sdpa);
  const auto device = resolve_device(o.rt.device);
  if (device.is_cpu()) track_cpu_allocations();  // peak memory as the bytes of live tensors
  if (o.sample) run_sample(o, device);
  else run_train(o, device);
}

}  // namespace

void register_bench(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  auto* cmd = app.add_subcommand("bench", "time training steps (or with --sample, the sampler) of a preset on random data");
  cmd->add_option("--preset", o->preset, "model preset")->capture_default_str();
  cmd->add_option("--batch", o->batch, "images per step (--sample: per sampler batch)")->capture_default_str();
  cmd->add_option("--steps", o->steps, "timed steps")->capture_default_str();
  cmd->add_option("--warmup", o->warmup, "untimed steps first")->capture_default_str();
  cmd->add_option("--latent-size", o->latent_size, "latent H = W (default: the preset's)");
  cmd->add_option("--in-channels", o->in_channels, "latent channels (default: the preset's)");
  cmd->add_option("--patch-size", o->patch_size, "patch size (default: the preset's)");
  cmd->add_option("--caption-channels", o->caption_channels, "caption embedding width (default: the preset's)");
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
  cmd->add_option("--bf16-weights", o->bf16_weights,
                  "with --bf16: the forward pass multiplies bf16 copies of the weights that the AdamW step writes, "
                  "instead of casting them every step: auto (on CUDA), on or off")
      ->capture_default_str();
  cmd->add_flag("--low-precision-layernorm", o->low_precision_layernorm,
                "LayerNorm in bf16 under autocast (Composer's low_precision_layernorm, as the reference trains)");
  cmd->add_flag("--cuda-graph", o->cuda_graph, "record the training step into a CUDA graph once, then replay it");
  cmd->add_flag("--memory", o->memory,
                "after timing, one more step that prints its memory: at the start, kept by the forward pass (with one "
                "CPU worker), and the peak over forward and backward");
  cmd->add_option("--profile", o->profile, "after timing, run this many more steps (--sample: sampling runs) under the "
                                          "profiler and list the GPU kernels, or on the CPU the operators' self times, "
                                          "by name and by call site")
      ->capture_default_str();
  cmd->add_option("--profile-rows", o->profile_rows, "rows of each --profile table")->capture_default_str();
  cmd->add_option("--profile-json", o->profile_json,
                  "--profile: also write every name and call site with its time to this JSON file (for "
                  "tools/compare_profiles.py, against tools/bench_reference.py --profile-json)");
  cmd->add_option("--sdpa", o->sdpa, "only this attention backend: flash, cudnn, efficient or math");
  cmd->add_flag("--sample", o->sample, "time the sampler (Heun, guidance) on random captions instead of training");
  cmd->add_option("--n", o->n, "--sample: images in all")->capture_default_str();
  cmd->add_option("--sampler-steps", o->sampler_steps, "--sample: Heun steps")->capture_default_str();
  cmd->add_option("--cfg", o->cfg, "--sample: guidance scale (1: off)")->capture_default_str();
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
