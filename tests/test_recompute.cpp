// Activation checkpointing (model/recompute.h): recomputing every block in the backward pass
// gives the gradients of the ordinary pass, with and without bf16 autocast and under the CPU
// workers' torch::autograd::grad, and the recorded graph really holds the recompute nodes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <set>

#include "core/autocast.h"
#include "core/precision.h"
#include "diffusion/edm.h"
#include "model/microdit.h"
#include "test_util.h"
#include "train/parallel_backward.h"

using namespace microdit;
using namespace microdit::test_util;

namespace {

// How many nodes of the graph behind `t` have a name containing `what`.
int count_nodes(const torch::Tensor& t, const std::string& what) {
  std::vector<torch::autograd::Node*> todo{t.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  int n = 0;
  while (!todo.empty()) {
    auto* node = todo.back();
    todo.pop_back();
    if (!node || !seen.insert(node).second) continue;
    if (node->name().find(what) != std::string::npos) ++n;
    for (const auto& e : node->next_edges()) todo.push_back(e.function.get());
  }
  return n;
}

struct Result {
  double loss;
  std::vector<torch::Tensor> grads;
  int recompute_nodes;
};

Result run(bool recompute, bool bf16, int workers = 1) {
  torch::manual_seed(0);
  const auto c = tiny_config();  // Pico: MoE in alternate blocks, 2 mixer blocks
  MicroDiT model(c);
  {
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.copy_(torch::randn(p.sizes()) * 0.05);
  }
  model->recompute_blocks = recompute;
  const int64_t B = 4;
  auto x = torch::randn({B, c.in_channels, c.input_size, c.input_size});
  auto y = torch::randn({B, 1, 5, c.caption_channels});
  auto rnd = torch::randn({B, 1, 1, 1}), noise = torch::randn(x.sizes()), mask_noise = torch::rand({B, c.num_tokens()});
  EDMConfig edm;
  Result r{0, {}, 0};
  const auto params = model->parameters();
  r.loss = parallel_backward(params, B, workers, 1.0, [&](int64_t s, int64_t n) {
    LossDraws d;
    d.rnd_normal = rnd.narrow(0, s, n);
    d.noise = noise.narrow(0, s, n);
    d.mask = mask_from_noise(mask_noise.narrow(0, s, n), c.kept_tokens(0.5));
    AutocastGuard autocast(c10::kCPU, bf16);
    auto loss = edm_loss(*model, x.narrow(0, s, n), y.narrow(0, s, n), d, edm);
    if (s == 0) r.recompute_nodes = count_nodes(loss, "RecomputedBlock");
    return loss;
  });
  for (const auto& p : params) r.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return r;
}

void expect_same_gradients(const Result& a, const Result& b, double tol) {
  ASSERT_EQ(a.grads.size(), b.grads.size());
  EXPECT_NEAR(a.loss, b.loss, tol * std::abs(a.loss));
  for (size_t i = 0; i < a.grads.size(); ++i) {
    const double scale = std::max(1e-6, a.grads[i].abs().max().item<double>());
    EXPECT_LT((a.grads[i] - b.grads[i]).abs().max().item<double>() / scale, tol) << "parameter " << i;
  }
}

}  // namespace

TEST(Recompute, SameGradientsAsKeepingActivations) {
  const auto kept = run(false, false), again = run(true, false);
  const int blocks = static_cast<int>(tiny_config().depth) + 2;  // backbone + patch mixer (tiny: 2 + 2)
  EXPECT_EQ(kept.recompute_nodes, 0);
  EXPECT_GE(again.recompute_nodes, 2) << "blocks were not checkpointed";
  EXPECT_LE(again.recompute_nodes, blocks);
  double largest = 0;
  for (const auto& g : kept.grads) largest = std::max(largest, g.abs().max().item<double>());
  ASSERT_GT(largest, 1e-4);
  expect_same_gradients(kept, again, 1e-5);
}

TEST(Recompute, KeepsAutocastAndWorksOnCPUWorkers) {
  // bf16: the recomputation must run under autocast as the forward did, else the
  // gradients would be of a different (fp32) function than the loss.
  expect_same_gradients(run(false, true), run(true, true), 1e-5);
  expect_same_gradients(run(false, false, 2), run(true, false, 2), 1e-5);
}

TEST(Precision, TF32SwitchesCuBLASMatmuls) {
  set_tf32(true);
  EXPECT_TRUE(tf32_enabled());
  set_tf32(false);
  EXPECT_FALSE(tf32_enabled());  // the default, and what the parity check needs
}
