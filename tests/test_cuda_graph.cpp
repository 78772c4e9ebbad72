// The CUDA-graph training step (train/cuda_graph.h) against the plain step, and the device-side
// AdamW scalars it needs (train/fused_adamw.h). The graph tests need a GPU and skip without one.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <optional>

#include "core/autocast.h"
#include "diffusion/edm.h"
#include "model/masking.h"
#include "model/microdit.h"
#include "test_util.h"
#include "core/cuda_graph.h"
#include "train/bf16_weights.h"
#include "train/fused_adamw.h"

using namespace microdit;
using namespace microdit::test_util;

namespace {

struct Run {
  std::vector<double> losses;        // one per step
  std::vector<torch::Tensor> params;  // after the last step, on the CPU
  int64_t host_steps = 0;             // the optimizer's step count of the first parameter
};

// `steps` training steps of a tiny MicroDiT (mask 0.5) whose inputs and noise live in tensors
// that stay put and are refilled from a seeded CPU generator before each step.
// mode 0: plain fused AdamW; 1: AdamW on device scalars, eager; 2: the same in a CUDA graph.
// copies: bf16 weight copies (train/bf16_weights.h; needs bf16).
Run train_tiny(c10::Device device, int mode, int steps, bool bf16, bool copies = false) {
  torch::manual_seed(0);
  auto c = tiny_config();
  MicroDiT model(c);
  small_random_weights(*model);
  model->to(device);
  torch::optim::AdamW opt(model->parameters(),
                          torch::optim::AdamWOptions(3e-3).betas({0.9, 0.99}).eps(1e-8).weight_decay(0.1));
  const int64_t B = 4;
  auto on = torch::TensorOptions().device(device);
  auto x = torch::empty({B, c.in_channels, c.input_size, c.input_size}, on);
  auto y = torch::empty({B, 1, 5, c.caption_channels}, on);
  auto rnd_normal = torch::empty({B, 1, 1, 1}, on), noise = torch::empty_like(x);
  auto mask_noise = torch::empty({B, c.num_tokens()}, on);
  auto loss_out = torch::zeros({}, on);
  AdamWDeviceScalars dev{torch::zeros({}, on), torch::full({}, 3e-3, on)};
  std::unique_ptr<Bf16Weights> w;
  if (copies) w = std::make_unique<Bf16Weights>(*model);
  EDMConfig edm;
  auto step = [&] {
    opt.zero_grad();
    LossDraws d{rnd_normal, noise, mask_from_noise(mask_noise, c.kept_tokens(0.5))};
    torch::Tensor loss;
    {
      std::optional<Bf16Weights::Bound> bound;
      if (w) bound.emplace(*w);
      {
        AutocastGuard autocast(device.type(), bf16);
        loss = edm_loss(*model, x, y, d, edm);
      }
      loss.backward();
    }
    loss_out.copy_(loss.detach());
    fused_adamw_step(opt, mode == 0 ? nullptr : &dev, w.get());
  };
  std::unique_ptr<CudaGraphStep> graph;
  if (mode == 2) graph = std::make_unique<CudaGraphStep>(device, step, /*warmup=*/2);
  Run r;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  for (int i = 0; i < steps; ++i) {
    x.copy_(at::randn(x.sizes(), gen));
    y.copy_(at::randn(y.sizes(), gen));
    rnd_normal.copy_(at::randn(rnd_normal.sizes(), gen));
    noise.copy_(at::randn(noise.sizes(), gen));
    mask_noise.copy_(at::rand(mask_noise.sizes(), gen));
    if (graph) graph->run();
    else step();
    r.losses.push_back(loss_out.item<double>());
  }
  if (graph) {
    EXPECT_TRUE(graph->captured());
  }
  for (auto& p : model->parameters()) r.params.push_back(p.detach().cpu().clone());
  auto& s = static_cast<torch::optim::AdamWParamState&>(
      *opt.state().at(model->parameters()[0].unsafeGetTensorImpl()));
  r.host_steps = s.step();
  return r;
}

double worst_relative(const Run& a, const Run& b) { return worst_relative_difference(a.params, b.params); }

void expect_same_run(const Run& plain, const Run& other, double loss_tol, double param_tol) {
  ASSERT_EQ(plain.losses.size(), other.losses.size());
  for (size_t i = 0; i < plain.losses.size(); ++i)
    EXPECT_NEAR(other.losses[i], plain.losses[i], loss_tol * std::abs(plain.losses[i])) << "step " << i;
  EXPECT_LT(worst_relative(plain, other), param_tol) << "largest relative parameter difference";
}

}  // namespace

TEST(CudaGraph, DeviceScalarsAdamWEqualsHostAdamW) {
  // The AdamW that a graph replays (step count and learning rate read from device tensors),
  // run eagerly on the CPU, against the plain fused step.
  const auto plain = train_tiny(torch::kCPU, 0, 5, false), dev = train_tiny(torch::kCPU, 1, 5, false);
  expect_same_run(plain, dev, 1e-4, 1e-4);  // lr in float32 instead of double: rounding only
  EXPECT_EQ(dev.host_steps, 5);
  // Steps that really move the weights, with losses that differ from step to step.
  EXPECT_NE(plain.losses[0], plain.losses[4]);
}

TEST(CudaGraph, SetAdamWStepCounts) {
  torch::manual_seed(0);
  MicroDiT model(tiny_config());
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3));
  set_adamw_step_counts(opt, 42);
  for (auto& p : model->parameters()) {
    auto& s = static_cast<torch::optim::AdamWParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
    EXPECT_EQ(s.step(), 42);
    EXPECT_EQ(s.exp_avg().abs().sum().item<double>(), 0.0);
  }
}

TEST(CudaGraph, NeedsACudaDevice) {
  EXPECT_THROW(CudaGraphStep(torch::kCPU, [] {}), std::exception);
  // The sampler refuses rather than silently running eagerly.
  torch::manual_seed(0);
  auto c = tiny_config();
  MicroDiT model(c);
  SamplerOptions so;
  so.steps = 2;
  so.cuda_graph = true;
  EXPECT_THROW(edm_sample(*model, torch::randn({1, c.in_channels, c.input_size, c.input_size}),
                          torch::randn({1, 1, 5, c.caption_channels}), EDMConfig{}, so),
               std::exception);
}

TEST(CudaGraph, GraphStepEqualsPlainStepFp32) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const c10::Device cuda(torch::kCUDA, 0);
  // 2 eager warm-up steps, the recording step, then 5 replays.
  const auto plain = train_tiny(cuda, 0, 8, false), graph = train_tiny(cuda, 2, 8, false);
  expect_same_run(plain, graph, 1e-4, 1e-4);
  EXPECT_EQ(graph.host_steps, 3);  // host-side counts stop at the recording: replays run kernels only
}

TEST(CudaGraph, GraphStepEqualsPlainStepBf16Autocast) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const c10::Device cuda(torch::kCUDA, 0);
  const auto plain = train_tiny(cuda, 0, 8, true), graph = train_tiny(cuda, 2, 8, true);
  // bf16 rounding in a different order (the MoE's index_add accumulates with atomics) moves
  // AdamW's sign-like updates of near-zero gradients: on an H200 the losses agreed within 2 %
  // and the parameters within 5.5 % of each tensor's largest entry. A replay of stale inputs or
  // a frozen step count would change the losses far more.
  expect_same_run(plain, graph, 2e-2, 0.15);
}

TEST(CudaGraph, DeviceScalarsWithBf16WeightCopies) {
  // The mixed-precision AdamW kernel reading the step count and learning rate from tensors
  // (as a graph replays it), eagerly on the CPU, against its host-scalar form.
  const auto plain = train_tiny(torch::kCPU, 0, 5, true, true), dev = train_tiny(torch::kCPU, 1, 5, true, true);
  expect_same_run(plain, dev, 2e-2, 0.15);  // lr in float32 instead of double, then bf16 rounding
  EXPECT_EQ(dev.host_steps, 5);
  EXPECT_NE(plain.losses[0], plain.losses[4]);
}

TEST(CudaGraph, GraphStepWithBf16WeightCopies) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const c10::Device cuda(torch::kCUDA, 0);
  // The copies' step recorded into a graph (the kernel's arguments, the copies and their
  // gradients' memory stay put between replays) against the same step run eagerly, and against
  // the plain bf16 step (tolerances as GraphStepEqualsPlainStepBf16Autocast).
  const auto eager = train_tiny(cuda, 0, 8, true, true), graph = train_tiny(cuda, 2, 8, true, true);
  expect_same_run(eager, graph, 2e-2, 0.15);
  expect_same_run(train_tiny(cuda, 0, 8, true), eager, 2e-2, 0.15);
}

TEST(CudaGraph, GraphSamplerEqualsEagerSampler) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const c10::Device cuda(torch::kCUDA, 0);
  torch::manual_seed(0);
  auto c = tiny_config();
  MicroDiT model(c);
  small_random_weights(*model);
  model->to(cuda);
  model->eval();
  auto z = torch::randn({3, c.in_channels, c.input_size, c.input_size}).to(cuda);
  auto y = torch::randn({3, 1, 5, c.caption_channels}).to(cuda);
  EDMConfig edm;
  SamplerOptions so;
  so.steps = 6;
  so.cfg = 3.0;
  for (bool bf16 : {false, true}) {
    AutocastGuard autocast(cuda.type(), bf16);
    so.cuda_graph = false;
    const auto eager = edm_sample(*model, z, y, edm, so).cpu();
    so.cuda_graph = true;
    const auto graphed = edm_sample(*model, z, y, edm, so).cpu();
    const double rel = (eager - graphed).norm().item<double>() / eager.norm().item<double>();
    EXPECT_LT(rel, bf16 ? 1e-2 : 1e-5) << (bf16 ? "bf16" : "fp32");
    EXPECT_GT(eager.abs().max().item<double>(), 0.1);
  }
}
