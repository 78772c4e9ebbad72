// The fast optimizer paths against the plain ones: fused AdamW (one ATen kernel) against
// torch::optim::AdamW, and the fused EMA against decay * s + (1 - decay) * p.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "diffusion/edm.h"
#include "model/microdit.h"
#include "test_util.h"
#include "train/fused_adamw.h"
#include "train/grad_clip.h"
#include "kernels/adamw.h"
#include "kernels/fused.h"
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

// The largest difference of the weights and second moments, relative to each tensor's largest value.
double worst_relative(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, (a[i] - b[i]).abs().max().item<double>() / std::max(1e-3, a[i].abs().max().item<double>()));
  return worst;
}

TEST(FusedAdamW, MatchesTorchOptimAdamW) {
  // One step: the same update up to float rounding (the kernels round in another order).
  EXPECT_LT(worst_relative(train_tiny(false, 1), train_tiny(true, 1)), 1e-6) << "after 1 step";
  // Six: the rounding differences have gone through the network's gradients five times.
  const auto plain = train_tiny(false, 6), fused = train_tiny(true, 6);
  ASSERT_EQ(plain.size(), fused.size());
  EXPECT_LT(worst_relative(plain, fused), 1e-3) << "largest relative difference after 6 steps";
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

// On the CPU the fused AdamW pass also applies the clipping's scale (clip_grad_norm leaves the
// gradients unscaled there) and moves the EMA: the same weights and EMA, bit for bit, as
// scaling the gradients in place, stepping, and updating the EMA in passes of their own; the
// EMA a copy before its start step and a decayed average after it.
TEST(FusedAdamW, ClipScaleAndEmaInTheSamePass) {
  struct Run {
    std::vector<torch::Tensor> params, ema;
    std::vector<double> norms;
  };
  const auto run = [](bool fused) {
    torch::manual_seed(0);
    const auto c = tiny_config();
    MicroDiT model(c);
    small_random_weights(*model);  // gradients everywhere, large enough to be clipped
    torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(3e-3).weight_decay(0.1));
    EMA ema(*model, 0.9, /*start=*/2);
    auto x = torch::randn({4, c.in_channels, c.input_size, c.input_size});
    auto y = torch::randn({4, 1, 5, c.caption_channels});
    Run r;
    for (int step = 1; step <= 4; ++step) {
      torch::manual_seed(100 + step);
      auto draws = draw_loss_randomness(x, 0.5, c.patch_size);
      opt.zero_grad();
      edm_loss(*model, x, y, draws, EDMConfig{}).backward();
      const double max_norm = 0.05;
      if (fused) {
        torch::Tensor coef;
        const auto before = model->parameters()[0].grad().clone();
        r.norms.push_back(clip_grad_norm(model->parameters(), max_norm, nullptr, &coef).item<double>());
        EXPECT_TRUE(torch::equal(model->parameters()[0].grad(), before)) << "the CPU's gradients are scaled by AdamW";
        EXPECT_LT(coef.item<double>(), 1.0) << "the clip must apply for this test to test it";
        const auto& e = ema.fused(step);
        fused_adamw_step(opt, nullptr, nullptr, coef, &e);
      } else {
        r.norms.push_back(clip_grad_norm(model->parameters(), max_norm).item<double>());
        fused_adamw_step(opt);
        ema.update(*model, step);
      }
    }
    for (const auto& p : model->parameters()) r.params.push_back(p.detach().clone());
    for (const auto& [name, t] : ema.tensors()) r.ema.push_back(t.clone());
    return r;
  };
  const auto separate = run(false), fused = run(true);
  EXPECT_EQ(separate.norms, fused.norms);
  for (size_t i = 0; i < separate.params.size(); ++i) {
    EXPECT_TRUE(torch::equal(separate.params[i], fused.params[i])) << "weight " << i;
    EXPECT_TRUE(torch::equal(separate.ema[i], fused.ema[i])) << "EMA " << i;
  }
  EXPECT_FALSE(torch::equal(fused.ema[0], fused.params[0]));  // past the start: an average, not a copy
}

// The CPU AdamW kernel's AVX-512, AVX2 and baseline builds give the same update (the baseline
// one without fused multiply-adds but in its EMA, so up to float rounding), float32 and bf16
// gradients, with a bf16 copy, the clipping's scale and the EMA.
TEST(FusedAdamW, CpuKernelAgreesAcrossInstructionSets) {
  struct Reset {
    ~Reset() { kernels::cpu::limit_instruction_set(2); }
  } reset;
  torch::manual_seed(4);
  const int64_t n = 3 * 512 + 77;  // whole blocks and a tail
  const auto p0 = torch::randn({n}), m0 = torch::randn({n}) * 0.01, v0 = torch::rand({n}) * 1e-4;
  const auto e0 = torch::randn({n}), g32 = torch::randn({n}) * 0.1;
  const auto g16 = g32.to(torch::kBFloat16);
  const float coef = 0.7f;
  kernels::AdamWHyper h;
  h.lr = 1e-3;
  h.weight_decay = 0.1;
  h.step = 3;
  h.grad_coef = &coef;
  h.ema_weight = 0.01;
  std::vector<std::vector<torch::Tensor>> out;  // per level: param, m, v, ema, copy
  for (const int level : {2, 1, 0}) {
    kernels::cpu::limit_instruction_set(level);
    for (const auto& g : {g32, g16}) {
      auto p = p0.clone(), m = m0.clone(), v = v0.clone(), e = e0.clone();
      auto copy = torch::empty({n}, torch::kBFloat16);
      const kernels::AdamWSlot slot{p.data_ptr<float>(), g.data_ptr(), m.data_ptr<float>(), v.data_ptr<float>(),
                                    copy.data_ptr(), n, e.data_ptr<float>()};
      const auto gt = g.scalar_type() == torch::kBFloat16 ? kernels::DType::bf16 : kernels::DType::f32;
      kernels::cpu::adamw_step(&slot, 1, gt, kernels::DType::bf16, h);
      out.push_back({p, m, v, e, copy.to(torch::kFloat)});
    }
  }
  ASSERT_EQ(out.size(), 6u);
  EXPECT_GT((out[0][0] - p0).abs().max().item<double>(), 1e-4);  // the weights moved
  for (size_t k = 2; k < out.size(); ++k)
    for (size_t t = 0; t < out[k].size(); ++t) {
      const auto& want = out[k % 2][t];  // the AVX-512 result for the same gradient dtype
      const double tol = t == 4 ? 1.0 / 128 : 1e-6;  // the copy: at most one bf16 unit apart
      EXPECT_LT(((out[k][t] - want).abs() / (want.abs() + 1e-3)).max().item<double>(), tol)
          << "level " << 2 - static_cast<int>(k / 2) << ", tensor " << t << ", gradient " << (k % 2 ? "bf16" : "float32");
    }
}
