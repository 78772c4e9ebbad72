#include <gtest/gtest.h>
#include <torch/torch.h>

#include "model/ffn.h"

using namespace microdit;

// Two experts, four tokens, capacity 1 -> each expert picks k = int(1*4/2) = 2 tokens.
TEST(ExpertChoiceMoE, HandComputedTinyCase) {
  torch::NoGradGuard ng;
  FeedForwardECMoE moe(/*d=*/2, /*n=*/2, /*experts=*/2, /*capacity=*/1.0);
  // Router: expert 0 scores x0 - x1... choose gate rows so probabilities are easy to reason.
  moe->gate->weight.copy_(torch::tensor({{4.f, 0.f}, {0.f, 4.f}}));
  // Expert 0: gelu(x W1) W2 with W1 = I, W2 = I; expert 1: W1 = I, W2 = 2 I.
  moe->w1.copy_(torch::stack({torch::eye(2), torch::eye(2)}));
  moe->w2.copy_(torch::stack({torch::eye(2), 2 * torch::eye(2)}));
  // Tokens: t0 strongly expert 0, t1 strongly expert 1, t2 mildly expert 0, t3 balanced
  // and small, so neither expert ranks it in its top 2.
  auto x = torch::tensor({{{2.f, 0.f}, {0.f, 2.f}, {1.f, 0.5f}, {0.1f, 0.1f}}});
  auto y = moe(x);  // (1, 4, 2)

  auto p = torch::softmax(torch::matmul(x, moe->gate->weight.t()), -1)[0];  // (4, 2)
  // Expert 0's column: t0 (0.9997), t2 (0.88), t3 (0.5), t1 (0.0003) -> picks t0, t2.
  // Expert 1's column: t1, then t3 (0.5) vs t2 (0.12) -> picks t1, t3.
  auto g = [](const torch::Tensor& v) { return torch::gelu(v); };
  auto expect = torch::zeros({4, 2});
  expect[0] = p[0][0] * g(x[0][0]);
  expect[2] = p[2][0] * g(x[0][2]);
  expect[1] = p[1][1] * 2 * g(x[0][1]);
  expect[3] = p[3][1] * 2 * g(x[0][3]);
  EXPECT_TRUE(torch::allclose(y[0], expect, 1e-5, 1e-6)) << y << expect;
}

TEST(ExpertChoiceMoE, TokenNoExpertPicksGetsZero) {
  torch::NoGradGuard ng;
  FeedForwardECMoE moe(2, 2, /*experts=*/2, /*capacity=*/0.5);  // k = int(0.5*4/2) = 1
  moe->gate->weight.copy_(torch::tensor({{4.f, 0.f}, {0.f, 4.f}}));
  moe->w1.copy_(torch::stack({torch::eye(2), torch::eye(2)}));
  moe->w2.copy_(torch::stack({torch::eye(2), torch::eye(2)}));
  auto x = torch::tensor({{{2.f, 0.f}, {0.f, 2.f}, {1.f, 0.5f}, {0.1f, 0.1f}}});
  auto y = moe(x)[0];
  // Expert 0 picks only t0, expert 1 only t1: t2 and t3 get exactly zero.
  EXPECT_GT(y[0].abs().sum().item<float>(), 0.f);
  EXPECT_GT(y[1].abs().sum().item<float>(), 0.f);
  EXPECT_EQ(y[2].abs().sum().item<float>(), 0.f);
  EXPECT_EQ(y[3].abs().sum().item<float>(), 0.f);
}

TEST(ExpertChoiceMoE, GradientsReachRouterAndExperts) {
  FeedForwardECMoE moe(4, 8, 4, 2.0);
  auto x = torch::randn({2, 8, 4}, torch::requires_grad());
  moe(x).pow(2).sum().backward();
  EXPECT_TRUE(moe->gate->weight.grad().defined());
  EXPECT_GT(moe->gate->weight.grad().abs().sum().item<float>(), 0.f);
  EXPECT_GT(moe->w1.grad().abs().sum().item<float>(), 0.f);
  EXPECT_GT(x.grad().abs().sum().item<float>(), 0.f);
}
