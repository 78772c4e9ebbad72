// The fast optimizer paths against the plain ones: fused AdamW (one ATen kernel) against
// torch::optim::AdamW, and the fused EMA against decay * s + (1 - decay) * p.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "diffusion/edm.h"
#include "model/microdit.h"
#include "test_util.h"
#include "train/fused_adamw.h"
#include "train/trainer.h"

using namespace microdit;
using namespace microdit::test_util;

namespace {

// Trains a tiny MicroDiT for `steps` AdamW steps on fixed data; returns its parameters.
std::vector<torch::Tensor> train_tiny(bool fused, int steps) {
  torch::manual_seed(0);
  const auto c = tiny_config();
  MicroDiT model(c);
  torch::optim::AdamW opt(model->parameters(),
                          torch::optim::AdamWOptions(3e-3).betas({0.9, 0.99}).eps(1e-8).weight_decay(0.1));
  auto x = torch::randn({4, c.in_channels, c.input_size, c.input_size});
  auto y = torch::randn({4, 1, 5, c.caption_channels});
  EDMConfig edm;
  for (int i = 0; i < steps; ++i) {
    torch::manual_seed(100 + i);
    auto draws = draw_loss_randomness(x, 0.5, c.patch_size);
    opt.zero_grad();
    edm_loss(*model, x, y, draws, edm).backward();
    if (fused) fused_adamw_step(opt);
    else opt.step();
  }
  std::vector<torch::Tensor> out;
  for (auto& p : model->parameters()) out.push_back(p.detach().clone());
  for (auto& g : opt.param_groups())
    for (auto& p : g.params()) {
      auto& s = static_cast<torch::optim::AdamWParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
      EXPECT_EQ(s.step(), steps);  // the fused step keeps the optimizer's own step count
      out.push_back(s.exp_avg_sq().clone());
    }
  return out;
}

}  // namespace

TEST(FusedAdamW, MatchesTorchOptimAdamW) {
  const auto plain = train_tiny(false, 6), fused = train_tiny(true, 6);
  ASSERT_EQ(plain.size(), fused.size());
  double worst = 0;
  for (size_t i = 0; i < plain.size(); ++i)
    worst = std::max(worst, (plain[i] - fused[i]).abs().max().item<double>() /
                                std::max(1e-3, plain[i].abs().max().item<double>()));
  EXPECT_LT(worst, 1e-4) << "largest relative difference after 6 steps";
  // And the steps really move the weights (a no-op would match a no-op).
  torch::manual_seed(0);
  MicroDiT init(tiny_config());
  double moved = 0;
  auto p0 = init->parameters();
  for (size_t i = 0; i < p0.size(); ++i) moved = std::max(moved, (p0[i] - fused[i]).abs().max().item<double>());
  EXPECT_GT(moved, 1e-3);
}

TEST(FusedAdamW, EMAIsTheDecayedAverage) {
  torch::manual_seed(0);
  MicroDiT model(tiny_config());
  EMA ema(*model, 0.9, /*start=*/2);
  torch::NoGradGuard ng;
  auto first = model->parameters()[0];
  first.add_(1.0);
  ema.update(*model, 1);  // before start: a copy
  const auto copied = ema.tensors()[0].second.clone();
  EXPECT_TRUE(torch::equal(copied, first));
  first.add_(2.0);
  ema.update(*model, 2);
  EXPECT_TRUE(torch::allclose(ema.tensors()[0].second, 0.9 * copied + 0.1 * first, 1e-6, 1e-6));
}
