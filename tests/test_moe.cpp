#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/autocast.h"
#include "kernels/fused.h"
#include "model/ffn.h"
#include "model/fused.h"
#include "test_util.h"

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

namespace {

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>() /
         std::max(1e-12, b.to(torch::kFloat64).abs().max().item<double>());
}

// The test layer (seed 3, experts' weights of scale 0.2) on `device`.
FeedForwardECMoE test_moe(c10::Device device) {
  torch::manual_seed(3);
  FeedForwardECMoE moe(/*d=*/24, /*n=*/40, /*experts=*/4, /*capacity=*/2.0);
  {
    torch::NoGradGuard ng;
    moe->w1.normal_(0, 0.2);
    moe->w2.normal_(0, 0.2);
  }
  moe->to(device);
  return moe;
}

// The layer's output and the gradients of x, gate, w1, w2 under one dispatch.
std::vector<torch::Tensor> moe_run(MoeDispatch m, bool bf16, c10::Device device) {
  const test_util::ScopedSetting dispatch(moe_dispatch, set_moe_dispatch, m);
  auto moe = test_moe(device);
  auto x = torch::randn({3, 10, 24}).to(device).requires_grad_(true);  // k = int(2 * 10 / 4) = 5 per expert
  torch::Tensor y;
  {
    AutocastGuard autocast(device.type(), bf16);
    y = moe(x);
  }
  y.backward(torch::randn(y.sizes()).to(device, y.scalar_type()));
  return {y.detach().cpu(), x.grad().cpu(), moe->gate->weight.grad().cpu(), moe->w1.grad().cpu(),
          moe->w2.grad().cpu()};
}

}  // namespace

TEST(ExpertChoiceMoE, GemmDispatchEqualsIndexDispatch) {
  // The one-hot products (the GPU default) and the index gather / index_add (the CPU default)
  // give the same result and gradients: exactly the same sums in float32, up to the bf16
  // rounding of the products' inputs and output under autocast (the reference's einsums).
  // On a GPU, where the products are the default, too.
  for (const auto device : test_util::test_devices())
  for (bool bf16 : {false, true}) {
    SCOPED_TRACE(device.str() + (bf16 ? ", bf16 autocast" : ", float32"));
    const auto index = moe_run(MoeDispatch::index, bf16, device);
    const auto gemm = moe_run(MoeDispatch::gemm, bf16, device);
    EXPECT_EQ(gemm[0].scalar_type(), bf16 ? at::kBFloat16 : at::kFloat);  // as the reference's einsum
    const char* names[] = {"output", "dx", "dgate", "dw1", "dw2"};
    for (size_t i = 0; i < index.size(); ++i) {
      ASSERT_TRUE(gemm[i].defined() && index[i].defined()) << names[i];
      EXPECT_GT(index[i].abs().max().item<double>(), 1e-4) << names[i];
      // cuBLAS may order a sum differently from the gather + index_add: float32 within 1e-5 there.
      EXPECT_LT(rel(gemm[i], index[i]), bf16 ? 2e-2 : device.is_cuda() ? 1e-5 : 1e-6) << names[i];
    }
  }
}

TEST(ExpertChoiceMoE, GatherDispatchEqualsGemmDispatch) {
  // The gathers and per-token sums (the CUDA default) against the one-hot products: the same
  // values in the same dtypes, with each term rounded as the products round it; only the
  // float32 order of a token's few expert terms may differ (cuBLAS). Gradients of x, the router
  // and both expert weights too, in float32 and under bf16 autocast.
  for (const auto device : test_util::test_devices())
  for (bool bf16 : {false, true}) {
    SCOPED_TRACE(device.str() + (bf16 ? ", bf16 autocast" : ", float32"));
    const auto gemm = moe_run(MoeDispatch::gemm, bf16, device);
    const auto gather = moe_run(MoeDispatch::gather, bf16, device);
    const char* names[] = {"output", "dx", "dgate", "dw1", "dw2"};
    for (size_t i = 0; i < gemm.size(); ++i) {
      ASSERT_TRUE(gemm[i].defined() && gather[i].defined()) << names[i];
      EXPECT_EQ(gather[i].scalar_type(), gemm[i].scalar_type()) << names[i];
      EXPECT_GT(gemm[i].abs().max().item<double>(), 1e-4) << names[i];
      // x is float32 here (in the model it is the norm's bf16 output): under autocast the products
      // take it in bf16 and hand dx back rounded to bf16, the gathers keep its float32 sum.
      if (bf16 && i == 1) EXPECT_LT(rel(gather[i], gemm[i]), 8e-3) << names[i];
      // On the CPU the same sums in the same order: to the bit. cuBLAS may order them otherwise.
      else if (device.is_cpu()) EXPECT_TRUE(torch::equal(gather[i], gemm[i])) << names[i];
      else EXPECT_LT(rel(gather[i], gemm[i]), bf16 ? 8e-3 : 1e-5) << names[i];
    }
  }
}

TEST(ExpertChoiceMoE, SamplingPathEqualsTrainingPath) {
  // Without autograd (sampling) the automatic dispatch takes the CPU's gathers and GELU runs in
  // place on the first product's output; the values are the training path's (index dispatch,
  // out-of-place GELU) to float32 rounding, in float32 and under bf16 autocast.
  const test_util::ScopedSetting dispatch(moe_dispatch, set_moe_dispatch, MoeDispatch::automatic);
  const test_util::ScopedSetting fused(fused_kernels_enabled, set_fused_kernels, true);
  for (const auto device : test_util::test_devices())
  for (bool bf16 : {false, true}) {
    SCOPED_TRACE(device.str() + (bf16 ? ", bf16 autocast" : ", float32"));
    auto moe = test_moe(device);
    const auto x = torch::randn({3, 10, 24}).to(device);
    AutocastGuard autocast(device.type(), bf16);
    const auto trained = moe(x);
    ASSERT_TRUE(trained.requires_grad());
    torch::Tensor sampled;
    {
      torch::NoGradGuard ng;
      sampled = moe(x);
    }
    EXPECT_EQ(sampled.scalar_type(), trained.scalar_type());
    EXPECT_GT(trained.abs().max().item<double>(), 1e-3);
    EXPECT_LT(rel(sampled, trained.detach()), bf16 ? 8e-3 : 1e-6);
  }
}

TEST(ExpertChoiceMoE, ExpertSumIsTheWeightedSumOfEachTokensSlots) {
  // moe_expert_sum against a loop over its definition: weighted and unweighted, float32 and
  // bf16 (terms rounded to the result's dtype, summed in float32), tokens picked by no expert,
  // one expert, or several; to the bit on the CPU (the same order), 1e-6 on CUDA.
  for (const auto device : test_util::test_devices())
  for (const auto st : {at::kFloat, at::kBFloat16})
  for (const auto dt : {at::kFloat, at::kBFloat16})
  for (const bool weighted : {false, true}) {
    SCOPED_TRACE(device.str() + " " + c10::toString(st) + " -> " + c10::toString(dt) + (weighted ? ", weighted" : ""));
    torch::manual_seed(5);
    const int64_t E = 3, B = 2, T = 7, k = 3, d = 37;
    const auto src = torch::randn({E, B, k, d}).to(st);
    const auto w = torch::rand({B, E, k});
    auto idx = torch::empty({B, E, k}, torch::kLong);  // distinct tokens per (b, e)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t e = 0; e < E; ++e) idx[b][e] = torch::randperm(T).narrow(0, 0, k);
    auto inv = torch::full({B, T, E}, -1, torch::kInt);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t i = 0; i < k; ++i) inv[b][idx[b][e][i].item<int64_t>()][e] = static_cast<int>(i);
    auto want = torch::zeros({B, T, d}, torch::kFloat);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) {
          const int s = inv[b][t][e].item<int>();
          if (s < 0) continue;
          auto term = src[e][b][s].to(torch::kFloat);
          if (weighted) term = term * w[b][e][s];
          want[b][t] += term.to(dt).to(torch::kFloat);
        }
    want = want.to(dt);
    const auto got =
        moe_expert_sum(src.to(device), weighted ? w.to(device) : torch::Tensor(), inv.to(device), dt).cpu();
    ASSERT_EQ(got.scalar_type(), dt);
    EXPECT_GT(want.abs().max().item<double>(), 0.1);
    EXPECT_EQ((inv == -1).all(2).any().item<bool>(), true);           // some token no expert picked ...
    EXPECT_EQ(((inv >= 0).sum(2) > 1).any().item<bool>(), true);      // ... and some picked twice or more
    if (device.is_cpu()) EXPECT_TRUE(torch::equal(got, want));
    else EXPECT_LT(rel(got, want), 1e-6);
  }
  // One-line errors for bad shapes.
  const auto src = torch::zeros({2, 1, 2, 4});
  EXPECT_THROW(moe_expert_sum(src, torch::Tensor(), torch::full({1, 3, 3}, -1, torch::kInt), at::kFloat),
               std::exception);  // inv names 3 experts, src has 2
  EXPECT_THROW(moe_expert_sum(src, torch::Tensor(), torch::full({1, 3, 2}, -1, torch::kLong), at::kFloat),
               std::exception);  // int64 slots
}

TEST(ExpertChoiceMoE, DispatchModes) {
  const test_util::ScopedSetting keep(moe_dispatch, set_moe_dispatch, moe_dispatch());
  const test_util::ScopedSetting fused(fused_kernels_enabled, set_fused_kernels, true);
  set_moe_dispatch(parse_moe_dispatch("auto"));
  EXPECT_EQ(moe_dispatch_on(c10::kCPU), MoeDispatch::index);
  // On the CPU the gathers when autograd does not record (sampling) and the fused kernels are on.
  EXPECT_EQ(moe_dispatch_on(c10::kCPU, /*grad=*/false), MoeDispatch::gather);
  // On CUDA the gathers when the fused kernels are compiled in and on, else the products.
  EXPECT_EQ(moe_dispatch_on(c10::kCUDA), kernels::available() ? MoeDispatch::gather : MoeDispatch::gemm);
  set_fused_kernels(false);
  EXPECT_EQ(moe_dispatch_on(c10::kCUDA), MoeDispatch::gemm);
  EXPECT_EQ(moe_dispatch_on(c10::kCPU, /*grad=*/false), MoeDispatch::index);
  set_fused_kernels(true);
  for (const auto& [name, mode] : {std::pair{"gemm", MoeDispatch::gemm}, std::pair{"index", MoeDispatch::index},
                                   std::pair{"gather", MoeDispatch::gather}}) {
    set_moe_dispatch(parse_moe_dispatch(name));
    EXPECT_EQ(moe_dispatch_on(c10::kCPU), mode) << name;
    EXPECT_EQ(moe_dispatch_on(c10::kCPU, /*grad=*/false), mode) << name;
    EXPECT_EQ(moe_dispatch_on(c10::kCUDA), mode) << name;
  }
  EXPECT_THROW(parse_moe_dispatch("scatter"), std::exception);
}

TEST(ExpertChoiceMoE, AutomaticDispatchLeavesGathersWhereTheyDoNotApply) {
  // The gathers' per-token sum takes at most 64 experts and the fused kernels' dtypes: beyond
  // them the automatic choice (here the CPU's without autograd, which is the gathers) takes the
  // index dispatch and gives its values, where it used to stop with the expert sum's error.
  const test_util::ScopedSetting keep(moe_dispatch, set_moe_dispatch, MoeDispatch::automatic);
  const test_util::ScopedSetting fused(fused_kernels_enabled, set_fused_kernels, true);
  torch::NoGradGuard ng;
  struct Case { int64_t experts, T; torch::ScalarType dtype; };
  for (const Case c : {Case{4, 10, torch::kDouble}, Case{65, 40, torch::kFloat}}) {
    SCOPED_TRACE(std::to_string(c.experts) + " experts, " + c10::toString(c.dtype));
    torch::manual_seed(5);
    FeedForwardECMoE moe(/*d=*/16, /*n=*/32, c.experts, /*capacity=*/2.0);
    moe->w1.normal_(0, 0.2);
    moe->w2.normal_(0, 0.2);
    moe->to(c.dtype);
    const auto x = torch::randn({2, c.T, 16}).to(c.dtype);
    torch::Tensor automatic;
    ASSERT_NO_THROW(automatic = moe(x));
    set_moe_dispatch(MoeDispatch::index);
    const auto index = moe(x);
    set_moe_dispatch(MoeDispatch::automatic);
    EXPECT_GT(index.abs().max().item<double>(), 1e-3);
    EXPECT_TRUE(torch::equal(automatic, index));
    // Asked for by name, the gathers still refuse with their one-line error.
    set_moe_dispatch(MoeDispatch::gather);
    EXPECT_THROW(moe(x), std::exception);
    set_moe_dispatch(MoeDispatch::automatic);
  }
}

TEST(ExpertChoiceMoE, CombineEqualsItsExpression) {
  // moe_combine against P^T (g * h^T) under LibTorch's autograd: the same values and gradients, in
  // float32 and under bf16 autocast (h in bf16 as the expert products give it there, g float32
  // as the router's softmax gives it). moe_combine takes the product and its rounding to bf16 in
  // one operator (mul_out into a bf16 tensor), the expression in two: on the CPU the same
  // operators in the same order, so 1e-6; on CUDA the matrix products may take other kernels.
  const int64_t B = 2, E = 3, k = 4, T = 7, d = 5;
  for (const auto device : test_util::test_devices())
    for (bool bf16 : {false, true}) {
      SCOPED_TRACE(device.str() + (bf16 ? " bf16 autocast" : " float32"));
      const double tol = device.is_cpu() ? 1e-6 : bf16 ? 1e-2 : 1e-5;
      torch::manual_seed(9);
      const auto opt = torch::TensorOptions().device(device);
      auto idx = torch::randint(T, {B, E * k, 1}, opt.dtype(torch::kLong));
      auto P = torch::zeros({B, E * k, T}, opt).scatter_(2, idx, 1.0);
      // h as the layer passes it: the experts' (E, B*k, d) output viewed (E, B, k, d).
      auto h = torch::randn({E, B, k, d}, opt).to(bf16 ? torch::kBFloat16 : torch::kFloat).requires_grad_(true);
      auto g = torch::rand({B, E, k}, opt).requires_grad_(true);
      auto dout = torch::randn({B, T, d}, opt);
      std::vector<torch::Tensor> plain, fused;
      for (bool use_fn : {false, true}) {
        h.mutable_grad() = torch::Tensor();
        g.mutable_grad() = torch::Tensor();
        torch::Tensor out;
        {
          AutocastGuard autocast(device.type(), bf16);
          out = use_fn ? moe_combine(P, h, g)
                       : torch::bmm(P.transpose(1, 2), (h.transpose(0, 1) * g.unsqueeze(-1)).reshape({B, E * k, d}));
        }
        out.backward(dout.to(out.scalar_type()));
        (use_fn ? fused : plain) = {out.detach(), h.grad(), g.grad()};
      }
      {
        // moe_combine hands on h's gradient in h's own layout (autograd::grad returns it as
        // the function made it): nothing left for a copy between the layouts.
        AutocastGuard autocast(device.type(), bf16);
        auto out = moe_combine(P, h, g);
        auto dh = torch::autograd::grad({out}, {h}, {dout.to(out.scalar_type())})[0];
        EXPECT_TRUE(dh.is_contiguous());
      }
      const char* names[] = {"output", "dh", "dg"};
      for (size_t i = 0; i < plain.size(); ++i) {
        EXPECT_EQ(fused[i].scalar_type(), plain[i].scalar_type()) << names[i];
        EXPECT_LT(rel(fused[i], plain[i]), tol) << names[i];
        EXPECT_GT(plain[i].abs().max().item<double>(), 1e-3) << names[i];
      }
    }
}
