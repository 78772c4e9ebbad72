// The feed-forward layers with their activations recomputed in the backward pass
// (model/ffn.h, RecomputeFfn) against the same layers under LibTorch's autograd: same values,
// same gradients, float32 and bf16 autocast, and a whole model step.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/autocast.h"
#include "model/ffn.h"
#include "model/layers.h"
#include "test_util.h"
#include "tiny_step.h"

using namespace microdit;
using namespace microdit::test_util;

namespace {

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>() /
         std::max(1e-12, b.to(torch::kFloat64).abs().max().item<double>());
}

// Result and gradients of f(inputs) for a fixed upstream gradient.
std::vector<torch::Tensor> run(const std::function<torch::Tensor()>& f, const std::vector<torch::Tensor>& inputs,
                               bool bf16) {
  for (auto t : inputs) t.mutable_grad() = torch::Tensor();
  torch::Tensor y;
  {
    AutocastGuard autocast(inputs[0].device().type(), bf16);
    y = f();
  }
  torch::manual_seed(5);
  y.backward(torch::randn(y.sizes()).to(y.device(), y.scalar_type()));
  std::vector<torch::Tensor> out{y.detach().cpu()};
  for (const auto& t : inputs) out.push_back(t.grad().cpu());
  return out;
}

void expect_same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b, double tol) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].scalar_type(), b[i].scalar_type()) << "tensor " << i;
    EXPECT_LT(rel(a[i], b[i]), tol) << "tensor " << i << " (0: the result, then the gradients)";
  }
}

}  // namespace

// The same operators in the same order: equal on the CPU. On a GPU the plain linear and our
// batched product may take different cuBLAS kernels, which sum in other orders.
double same_tol(c10::Device device, bool bf16) { return device.is_cpu() ? 1e-12 : bf16 ? 1e-2 : 1e-5; }

TEST(RecomputeFfn, GeluBmmSameValuesAndGradients) {
  for (const auto device : test_devices()) {
  torch::manual_seed(0);
  auto a = torch::randn({3, 20, 48}).to(device).requires_grad_(true);
  auto w = (0.2 * torch::randn({3, 48, 16})).to(device).requires_grad_(true);
  for (bool bf16 : {false, true}) {
    SCOPED_TRACE(device.str() + (bf16 ? ", bf16 autocast" : ", float32"));
    const auto plain = run([&] { return gelu_bmm(a, w, false); }, {a, w}, bf16);
    const auto rec = run([&] { return gelu_bmm(a, w, true); }, {a, w}, bf16);
    expect_same(rec, plain, same_tol(device, bf16));
    EXPECT_EQ(rec[0].scalar_type(), bf16 ? at::kBFloat16 : at::kFloat);
    EXPECT_EQ(rec[2].scalar_type(), at::kFloat);  // the parameter's gradient stays float32
  }
  }
}

TEST(RecomputeFfn, SwiGLULinearSameValuesAndGradients) {
  // With the fused SwiGLU kernels (the default) and with LibTorch's silu and mul.
  for (const auto device : test_devices())
  for (bool fused : {true, false})
  for (bool bias : {true, false}) {
    const ScopedSetting switch_(fused_kernels_enabled, set_fused_kernels, fused);
    torch::manual_seed(1);
    Linear w3(torch::nn::LinearOptions(40, 24).bias(bias));
    w3->to(device);
    auto u = torch::randn({2, 9, 40}).to(device).requires_grad_(true);
    auto v = torch::randn({2, 9, 40}).to(device).requires_grad_(true);
    std::vector<torch::Tensor> inputs{u, v, w3->weight};
    if (bias) inputs.push_back(w3->bias);
    for (bool bf16 : {false, true}) {
      SCOPED_TRACE(device.str() + (fused ? ", fused" : ", LibTorch") + (bias ? ", bias, " : ", no bias, ") +
                   (bf16 ? "bf16 autocast" : "float32"));
      const auto plain = run([&] { return swiglu_linear(u, v, w3, false); }, inputs, bf16);
      const auto rec = run([&] { return swiglu_linear(u, v, w3, true); }, inputs, bf16);
      expect_same(rec, plain, same_tol(device, bf16));
    }
  }
}

TEST(RecomputeFfn, TinyModelStepSameGradients) {
  const test_util::ScopedSetting keep(recompute_ffn, set_recompute_ffn, recompute_ffn());
  for (bool bf16 : {false, true}) {
    SCOPED_TRACE(bf16 ? "bf16 autocast" : "float32");
    TinyStepOptions o;
    o.bf16 = bf16;
    set_recompute_ffn(RecomputeFfn::off);
    const auto plain = tiny_step(o);
    set_recompute_ffn(RecomputeFfn::always);
    const auto rec = tiny_step(o);
    // The forward pass is the same operators: same loss, same expert choices.
    EXPECT_EQ(rec.loss, plain.loss);
    EXPECT_LT(worst_relative(rec, plain), 1e-12);
    EXPECT_GT(largest_gradient(plain), 1e-3);
  }
}

TEST(RecomputeFfn, ModesAndNoGrad) {
  const test_util::ScopedSetting keep(recompute_ffn, set_recompute_ffn, recompute_ffn());
  auto cpu = torch::ones({2, 3});
  set_recompute_ffn(parse_recompute_ffn("cuda"));
  EXPECT_FALSE(recompute_ffn_for(cpu));  // the default leaves the CPU alone
  set_recompute_ffn(parse_recompute_ffn("always"));
  EXPECT_TRUE(recompute_ffn_for(cpu));
  {
    torch::NoGradGuard no_grad;  // sampling: nothing is kept anyway
    EXPECT_FALSE(recompute_ffn_for(cpu));
  }
  set_recompute_ffn(parse_recompute_ffn("off"));
  EXPECT_FALSE(recompute_ffn_for(cpu));
  EXPECT_NE(error_of([] { parse_recompute_ffn("sometimes"); }).find("expected off, cuda or always"),
            std::string::npos);
}
