// Data parallelism inside one process (train/parallel_backward.h): row slices of a batch on
// side-by-side CPU workers give the gradients and loss of one pass over the whole batch.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/autocast.h"
#include "core/error.h"
#include "diffusion/edm.h"
#include "model/microdit.h"
#include "test_util.h"
#include "train/parallel_backward.h"

using namespace microdit;
using namespace microdit::test_util;

namespace {

struct Grads {
  double loss = 0;
  std::vector<torch::Tensor> grads;  // one per parameter (zeros where unused)
};

// One step's gradients for a tiny MicroDiT (Pico: expert-choice MoE in alternate blocks) on
// 7 rows with masking, split over `workers`; `accumulate` starts from .grad = 1 everywhere.
Grads step(int workers, bool bf16, bool accumulate = false) {
  torch::manual_seed(0);
  const auto c = tiny_config();
  MicroDiT model(c);
  {  // the reference's zero-initialised output layers would make most gradients zero
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.copy_(torch::randn(p.sizes()) * 0.05);
  }
  const int64_t B = 7, T = c.num_tokens();
  auto x = torch::randn({B, c.in_channels, c.input_size, c.input_size});
  auto y = torch::randn({B, 1, 5, c.caption_channels});
  auto rnd = torch::randn({B, 1, 1, 1}), noise = torch::randn(x.sizes()), mask_noise = torch::rand({B, T});
  const auto params = model->parameters();
  if (accumulate)
    for (const auto& p : params) const_cast<torch::Tensor&>(p).mutable_grad() = torch::ones_like(p);
  EDMConfig edm;
  Grads g;
  g.loss = parallel_backward(params, B, workers, 0.5, [&](int64_t s, int64_t n) {
    LossDraws d;
    d.rnd_normal = rnd.narrow(0, s, n);
    d.noise = noise.narrow(0, s, n);
    d.mask = mask_from_noise(mask_noise.narrow(0, s, n), c.kept_tokens(0.5));
    AutocastGuard autocast(c10::kCPU, bf16);
    return edm_loss(*model, x.narrow(0, s, n), y.narrow(0, s, n), d, edm);
  });
  for (const auto& p : params) g.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return g;
}

double worst_relative(const Grads& a, const Grads& b) {
  double worst = 0;
  for (size_t i = 0; i < a.grads.size(); ++i)
    worst = std::max(worst, (a.grads[i] - b.grads[i]).abs().max().item<double>() /
                                std::max(1e-6, a.grads[i].abs().max().item<double>()));
  return worst;
}

}  // namespace

TEST(ParallelBackward, SlicesGiveTheWholeBatchGradient) {
  const auto one = step(1, false);
  double largest = 0;
  for (const auto& g : one.grads) largest = std::max(largest, g.abs().max().item<double>());
  ASSERT_GT(largest, 1e-4) << "the gradients must not be trivially zero";
  for (int workers : {2, 3, 7}) {
    const auto split = step(workers, false);
    EXPECT_NEAR(split.loss, one.loss, 1e-6 * std::abs(one.loss)) << workers << " workers";
    EXPECT_LT(worst_relative(one, split), 1e-4) << workers << " workers";
  }
}

TEST(ParallelBackward, AddsToExistingGradientsAndKeepsAutocast) {
  const auto fresh = step(2, false), added = step(2, false, /*accumulate=*/true);
  for (size_t i = 0; i < fresh.grads.size(); ++i)
    ASSERT_TRUE(torch::allclose(added.grads[i], fresh.grads[i] + 1, 1e-5, 1e-6)) << "parameter " << i;
  // bf16 autocast reaches the workers: their gradients differ from fp32's by bf16 rounding,
  // and agree with one bf16 pass over the whole batch.
  const auto bf_one = step(1, true), bf_split = step(2, true), fp = step(2, false);
  EXPECT_GT(worst_relative(fp, bf_split), 1e-4) << "autocast did not reach the workers";
  EXPECT_LT(worst_relative(bf_one, bf_split), 0.1);
}

TEST(ParallelBackward, IsDeterministic) {
  const auto a = step(3, false), b = step(3, false);
  for (size_t i = 0; i < a.grads.size(); ++i) ASSERT_TRUE(torch::equal(a.grads[i], b.grads[i]));
}

TEST(ParallelBackward, WorkerCounts) {
  EXPECT_EQ(resolve_cpu_workers(1, c10::Device("cpu"), false), 1);
  EXPECT_EQ(resolve_cpu_workers(3, c10::Device("cpu"), false), 3);
  EXPECT_EQ(resolve_cpu_workers(0, c10::Device("cpu"), true), 1);
  EXPECT_EQ(resolve_cpu_workers(0, c10::Device("cpu"), false), at::get_num_threads());
  EXPECT_EQ(resolve_cpu_workers(4, c10::Device("cuda"), false), 1);
  EXPECT_THROW(resolve_cpu_workers(-1, c10::Device("cpu"), false), Error);
  EXPECT_THROW(resolve_cpu_workers(2, c10::Device("cpu"), true), Error);
}
