#include <gtest/gtest.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/torch.h>

#include "train/grad_clip.h"

using namespace microdit;

namespace {

// Parameters of several shapes with gradients scaled by `g`; one without a gradient.
std::vector<torch::Tensor> params_with_grads(double g) {
  torch::manual_seed(3);
  std::vector<torch::Tensor> ps;
  for (auto shape : std::vector<std::vector<int64_t>>{{7, 5}, {5}, {3, 4, 2}, {1}}) {
    ps.push_back(torch::randn(shape).requires_grad_(true));
    ps.back().mutable_grad() = torch::randn(shape) * g;
  }
  ps.push_back(torch::randn({4}).requires_grad_(true));  // no .grad
  return ps;
}

}  // namespace

TEST(GradClip, EqualsLibTorchsClipGradNormWithoutAHostRead) {
  for (double g : {0.01, 1.0, 30.0}) {  // below, around and above max_norm
    auto a = params_with_grads(g), b = params_with_grads(g);
    const double want = torch::nn::utils::clip_grad_norm_(a, 1.0);
    const auto got = clip_grad_norm(b, 1.0);
    ASSERT_TRUE(got.defined());
    EXPECT_EQ(got.dim(), 0);
    EXPECT_NEAR(got.item<double>(), want, 1e-6 * want) << "g " << g;
    for (size_t i = 0; i + 1 < a.size(); ++i)
      EXPECT_TRUE(torch::allclose(a[i].grad(), b[i].grad(), 1e-6, 1e-9)) << "g " << g << " param " << i;
    EXPECT_FALSE(b.back().grad().defined());
    if (g == 0.01) {  // under the limit: gradients untouched, bit for bit
      auto c = params_with_grads(g);
      for (size_t i = 0; i + 1 < c.size(); ++i) EXPECT_TRUE(torch::equal(b[i].grad(), c[i].grad()));
    }
  }
  std::vector<torch::Tensor> none{torch::zeros({2}).requires_grad_(true)};
  EXPECT_FALSE(clip_grad_norm(none, 1.0).defined());
}

// CPU gradients left for the AdamW kernel to scale: their norms are taken on the CPU workers,
// a gradient each (large ones too), and must give LibTorch's norm and coefficient.
TEST(GradClip, DeferredCpuNormsOnTheWorkersEqualLibTorchs) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  for (double g : {0.01, 30.0}) {
    auto a = params_with_grads(g), b = params_with_grads(g);
    for (auto* ps : {&a, &b}) {  // and one gradient large enough for several threads in LibTorch's norm
      torch::manual_seed(5);
      ps->push_back(torch::randn({300, 1000}).requires_grad_(true));
      ps->back().mutable_grad() = torch::randn({300, 1000}) * g;
    }
    const double want = torch::nn::utils::clip_grad_norm_(a, 1.0);
    std::vector<torch::Tensor> before;
    for (const auto& p : b) before.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
    torch::Tensor coef;
    const auto got = clip_grad_norm(b, 1.0, nullptr, &coef);
    EXPECT_NEAR(got.item<double>(), want, 1e-6 * want) << "g " << g;
    EXPECT_NEAR(coef.item<double>(), std::min(1.0, 1.0 / (want + 1e-6)), 1e-6) << "g " << g;
    for (size_t i = 0; i < b.size(); ++i)  // left unscaled: the AdamW kernel applies coef
      if (before[i].defined()) EXPECT_TRUE(torch::equal(b[i].grad(), before[i])) << "param " << i;
  }
  at::set_num_threads(threads);
}
