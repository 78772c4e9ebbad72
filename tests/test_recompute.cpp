// Activation checkpointing (model/recompute.h): recomputing every block in the backward pass
// gives the gradients of the ordinary pass, with and without bf16 autocast and under the CPU
// workers' torch::autograd::grad, and the recorded graph really holds the recompute nodes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <set>

#include "core/precision.h"
#include "tiny_step.h"

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
  TinyStep step;
  int recompute_nodes = 0;
};

Result run(bool recompute, bool bf16, int workers = 1) {
  TinyStepOptions o;
  o.recompute = recompute;
  o.bf16 = bf16;
  o.workers = workers;
  Result r;
  r.step = tiny_step(o, [&](const torch::Tensor& loss) { r.recompute_nodes = count_nodes(loss, "RecomputedBlock"); });
  return r;
}

void expect_same_gradients(const Result& a, const Result& b, double tol) {
  ASSERT_EQ(a.step.grads.size(), b.step.grads.size());
  EXPECT_NEAR(a.step.loss, b.step.loss, tol * std::abs(a.step.loss));
  EXPECT_LT(worst_relative(a.step, b.step), tol);
}

}  // namespace

TEST(Recompute, SameGradientsAsKeepingActivations) {
  const auto kept = run(false, false), again = run(true, false);
  const int blocks = static_cast<int>(tiny_config().depth) + 2;  // backbone + patch mixer (tiny: 2 + 2)
  EXPECT_EQ(kept.recompute_nodes, 0);
  EXPECT_GE(again.recompute_nodes, 2) << "blocks were not checkpointed";
  EXPECT_LE(again.recompute_nodes, blocks);
  ASSERT_GT(largest_gradient(kept.step), 1e-4);
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
