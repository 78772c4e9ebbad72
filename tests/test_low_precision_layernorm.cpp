// LayerNorm in the autocast dtype (train.low_precision_layernorm, model/layers.h): the same
// normalisation up to bf16 rounding under autocast, and exactly the float32 one without it.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/autocast.h"
#include "model/layers.h"
#include "model/microdit.h"
#include "test_util.h"

using namespace microdit;

TEST(LowPrecisionLayerNorm, Bf16UnderAutocastFloat32Otherwise) {
  // LibTorch's operators (the fused kernels, on by default, are below); the switch is
  // restored however the test ends.
  const test_util::ScopedSetting restore(fused_kernels_enabled, set_fused_kernels, false);
  torch::manual_seed(0);
  LayerNorm ln(64, 1e-6);
  {
    torch::NoGradGuard ng;
    ln->weight.uniform_(0.5, 1.5);
  }
  auto x = torch::randn({4, 10, 64}) * 3 + 1;
  const auto ref = ln(x);  // float32
  ln->low_precision = true;
  EXPECT_TRUE(torch::equal(ln(x), ref)) << "no autocast: unchanged";
  AutocastGuard autocast(torch::kCPU, true);
  auto y = ln(x);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_LT((y.to(torch::kFloat) - ref).abs().max().item<double>(), 0.05);
  ln->low_precision = false;
  EXPECT_EQ(ln(x).scalar_type(), torch::kFloat) << "autocast runs layer_norm in float32";
  // Gradients reach the float32 weight through the cast.
  ln->low_precision = true;
  ln(x).to(torch::kFloat).sum().backward();
  ASSERT_TRUE(ln->weight.grad().defined());
  EXPECT_EQ(ln->weight.grad().scalar_type(), torch::kFloat);

  // The fused kernel gives the autocast dtype either way (its result goes to a matmul that
  // autocast would cast anyway); low precision also takes the statistics over x in bf16.
  set_fused_kernels(true);
  ln->low_precision = false;
  auto yf = ln(x);
  EXPECT_EQ(yf.scalar_type(), torch::kBFloat16);
  EXPECT_LT((yf.to(torch::kFloat) - ref).abs().max().item<double>(), 0.05);
  ln->low_precision = true;
  EXPECT_LT((ln(x).to(torch::kFloat) - ref).abs().max().item<double>(), 0.05);
}

TEST(LowPrecisionLayerNorm, SetsEveryLayerNormOfTheModel) {
  MicroDiT model(test_util::tiny_config());
  set_low_precision_layernorm(*model, true);
  int n = 0;
  for (auto& m : model->modules())
    if (auto* ln = m->as<LayerNormImpl>()) {
      EXPECT_TRUE(ln->low_precision);
      ++n;
    }
  EXPECT_GT(n, 10);
}
