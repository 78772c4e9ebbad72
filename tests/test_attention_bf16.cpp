// bf16 attention on AMX or AVX512-BF16 (kernels/attention_cpu.h, model/attention.cpp): which
// kernel CPU attention takes, both kernels' passes against attention in float64 on the same bf16
// values (odd and long sequences, strided heads, every width class), their one-line errors, and
// the model's attention and a whole training step through them. The tests skip on CPUs with
// neither; the AVX512-BF16 kernels' own tests run on AMX CPUs too.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <string>

#include "core/autocast.h"
#include "kernels/attention_cpu.h"
#include "model/attention.h"
#include "attention_test_util.h"
#include "test_util.h"
#include "tiny_step.h"

using namespace microdit;

using namespace microdit::attention_test;

namespace {

torch::Tensor heads(int64_t B, int64_t seq, int64_t H, int64_t hd) { return attention_test::heads(B, seq, H, hd, torch::kBFloat16); }

}  // namespace

TEST(Bf16Attention, ChoiceOfKernel) {
  const Mode automatic(CpuAttention::automatic);
  const auto f32 =
      kernels::cpu::avx512_attention_available() ? CpuAttentionKernel::float32 : CpuAttentionKernel::aten_float32;
  EXPECT_EQ(cpu_attention_kernel(32), f32);  // no autocast
  {
    const Mode aten(CpuAttention::aten_float32);
    EXPECT_EQ(cpu_attention_kernel(32), CpuAttentionKernel::aten_float32);
  }
  AutocastGuard ac(c10::kCPU, true);
  const auto bf16_kernel = kernels::cpu::amx_attention_available()           ? CpuAttentionKernel::amx_bf16
                           : kernels::cpu::avx512_bf16_attention_available() ? CpuAttentionKernel::avx512_bf16
                                                                              : f32;
  EXPECT_EQ(kernels::cpu::bf16_attention_available(), bf16_kernel != f32);
  EXPECT_EQ(cpu_attention_kernel(16), bf16_kernel);
  EXPECT_EQ(cpu_attention_kernel(32), bf16_kernel);
  EXPECT_EQ(cpu_attention_kernel(64), bf16_kernel);
  EXPECT_EQ(cpu_attention_kernel(256), bf16_kernel);
  EXPECT_EQ(cpu_attention_kernel(8), f32);  // brgemm's column blocks, whole vectors
  EXPECT_EQ(cpu_attention_kernel(24), f32);
  EXPECT_EQ(cpu_attention_kernel(272), f32);
  {
    const Mode float32(CpuAttention::float32);
    EXPECT_EQ(cpu_attention_kernel(32), f32);
  }
  {
    const Mode aten(CpuAttention::aten_float32);
    EXPECT_EQ(cpu_attention_kernel(32), CpuAttentionKernel::aten_float32);
  }
  const Mode bf16(CpuAttention::bf16);
  EXPECT_EQ(cpu_attention_kernel(32), CpuAttentionKernel::aten_bf16);
  EXPECT_EQ(cpu_attention_kernel(8), CpuAttentionKernel::aten_bf16);
  EXPECT_STREQ(cpu_attention_kernel_name(CpuAttentionKernel::amx_bf16), "bf16 AMX");
  EXPECT_STREQ(cpu_attention_kernel_name(CpuAttentionKernel::avx512_bf16), "bf16 AVX512-BF16");
  EXPECT_STREQ(cpu_attention_kernel_name(CpuAttentionKernel::aten_bf16), "bf16 ATen");
  EXPECT_STREQ(cpu_attention_kernel_name(CpuAttentionKernel::float32), "float32");
  EXPECT_STREQ(cpu_attention_kernel_name(CpuAttentionKernel::aten_float32), "float32 ATen");
}

// The mixer's self-attention, a cross-attention over 77 caption tokens, odd lengths (padding of
// brgemm's K and column blocks; the AVX512-BF16 kernels' pairs and partial query blocks), more
// keys than one column block, the widest head, and widths past one chunk of vectors.
const AttentionShape kBf16Shapes[] = {{2, 4, 256, 256, 32}, {2, 4, 64, 77, 32}, {3, 2, 33, 5, 64},
                                      {1, 2, 7, 300, 16},   {2, 1, 17, 17, 128}, {1, 2, 45, 9, 144},
                                      {1, 1, 5, 20, 256}};
// bf16 results: their own rounding is 2^-9 (0.2 %) per value; measured 0.22-0.31 % (AMX),
// 0.19-0.28 % (AVX512-BF16).
const Float64Bounds kBf16Bounds{.lse = 2e-5, .values = 6e-3, .aten_lse = 1e-4, .aten_values = 6e-3};

TEST(Bf16Attention, PassesEqualAttentionInFloat64) {
  if (!kernels::cpu::bf16_attention_available()) GTEST_SKIP() << "neither AMX nor AVX512-BF16 on this CPU";
  torch::manual_seed(11);
  for (const AttentionShape s : kBf16Shapes)
    expect_passes_near_float64(s, torch::kBFloat16, kernels::cpu::attention_forward_bf16,
                               kernels::cpu::attention_backward_bf16, kBf16Bounds);
}

TEST(Bf16Attention, Avx512PassesEqualAttentionInFloat64) {
  // The AVX512-BF16 kernels called directly: on AMX CPUs too, where the entry points above take AMX.
  if (!kernels::cpu::avx512_bf16_attention_available()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  torch::manual_seed(13);
  for (const AttentionShape s : kBf16Shapes)
    expect_passes_near_float64(s, torch::kBFloat16, kernels::cpu::attention_forward_bf16_avx512,
                               kernels::cpu::attention_backward_bf16_avx512, kBf16Bounds);
}

TEST(Bf16Attention, Avx512OddViewsEqualContiguousCopies) {
  // The kernels read bf16 pairs as 32-bit words: heads of rows 33 wide from index 1 (odd row
  // strides, odd starts) give the same bits as contiguous copies of them, in every input.
  if (!kernels::cpu::avx512_bf16_attention_available()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  torch::manual_seed(14);
  auto odd = [](const torch::Tensor& t) {  // t (1, 2, seq, 16) as heads of a (1, seq, 33) tensor, from index 1
    const auto seq = t.size(2);
    auto rows = torch::zeros({1, seq, 33}, torch::kBFloat16).narrow(2, 1, 32);
    auto heads = rows.view({1, seq, 2, 16}).transpose(1, 2);
    heads.copy_(t);
    return heads;
  };
  auto h = [](int64_t seq) { return torch::randn({1, 2, seq, 16}).to(torch::kBFloat16); };
  const auto q = h(9), k = h(6), v = h(6), g = h(9);
  ASSERT_EQ(odd(q).stride(2) % 2, 1);
  namespace kc = kernels::cpu;
  const auto [o, lse] = kc::attention_forward_bf16_avx512(q, k, v, 0.25, true);
  const auto [o_odd, lse_odd] = kc::attention_forward_bf16_avx512(odd(q), odd(k), odd(v), 0.25, true);
  EXPECT_TRUE(torch::equal(o, o_odd));
  EXPECT_TRUE(torch::equal(lse, lse_odd));
  const auto [dq, dk, dv] = kc::attention_backward_bf16_avx512(q, k, v, o, lse, g, 0.25);
  const auto [dq_odd, dk_odd, dv_odd] =
      kc::attention_backward_bf16_avx512(odd(q), odd(k), odd(v), odd(o), lse, odd(g), 0.25);
  EXPECT_TRUE(torch::equal(dq, dq_odd));
  EXPECT_TRUE(torch::equal(dk, dk_odd));
  EXPECT_TRUE(torch::equal(dv, dv_odd));
  EXPECT_GT(dq.abs().sum().item<double>(), 0);
}

TEST(Bf16Attention, OneLineErrors) {
  const auto q = heads(1, 8, 2, 16), k = heads(1, 8, 2, 16);
  const auto lse = torch::zeros({1, 2, 8});
  if (!kernels::cpu::bf16_attention_available()) {
    const auto e = what_of([&] { kernels::cpu::attention_backward_bf16(q, k, k, q, lse, q, 0.25); });
    EXPECT_NE(e.find("neither AMX nor AVX512-BF16"), std::string::npos) << e;
    GTEST_SKIP() << "neither AMX nor AVX512-BF16 on this CPU";
  }
  auto expect = [](const std::function<void()>& f, const std::string& what) {
    expect_one_line_error(f, "CPU bf16 attention: ", what);
  };
  const auto f = q.to(torch::kFloat);
  using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                                      const at::Tensor&, const at::Tensor&,
                                                                      const at::Tensor&, const at::Tensor&, double);
  using Forward = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         double, bool);
  std::vector<std::pair<Forward, Backward>> kernels_here{
      {kernels::cpu::attention_forward_bf16, kernels::cpu::attention_backward_bf16}};
  if (kernels::cpu::avx512_bf16_attention_available())
    kernels_here.emplace_back(kernels::cpu::attention_forward_bf16_avx512,
                              kernels::cpu::attention_backward_bf16_avx512);
  for (const auto& [forward, backward] : kernels_here) {
    expect([&] { backward(f, k, k, q, lse, q, 0.25); }, "bf16");
    const auto q8 = heads(1, 8, 2, 8);
    expect([&] { backward(q8, q8, q8, q8, lse, q8, 0.25); }, "head size 8");
    expect([&] { backward(q, k, k, q, torch::zeros({1, 8, 2}), q, 0.25); }, "lse");
    expect([&] { backward(q, heads(1, 8, 2, 32), k, q, lse, q, 0.25); }, "(B, H, L, hd)");
    expect([&] { backward(q, k, k, heads(1, 9, 2, 16), lse, q, 0.25); }, "q's shape");
    expect([&] { forward(f, k, k, 0.25, true); }, "bf16");
    expect([&] { forward(q, k, k, 0.0, true); }, "scale");
  }
}

TEST(Bf16Attention, ModelAttentionWithAndWithoutGradients) {
  // Under bf16 autocast multi_head_attention takes the bf16 kernels: bf16 output, the same bits
  // with and without gradients (a checkpointed block's forward runs without them and its
  // recomputation with them), and attention's gradients in the inputs' dtypes.
  if (!kernels::cpu::bf16_attention_available()) GTEST_SKIP() << "neither AMX nor AVX512-BF16 on this CPU";
  const Mode automatic(CpuAttention::automatic);
  torch::manual_seed(12);
  auto q = torch::randn({2, 40, 4, 16}).requires_grad_();  // (B, N, H, hd) float32, as LN gives
  auto k = torch::randn({2, 23, 4, 16}).to(torch::kBFloat16).requires_grad_();
  auto v = torch::randn({2, 23, 4, 16}).to(torch::kBFloat16).requires_grad_();
  torch::Tensor o, o_no_grad;
  {
    AutocastGuard ac(c10::kCPU, true);
    o = multi_head_attention(q, k, v);  // (B, N, H * hd)
    torch::NoGradGuard ng;
    o_no_grad = multi_head_attention(q, k, v);
  }
  EXPECT_EQ(o.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(o.detach(), o_no_grad));
  auto bf16_values = [](const torch::Tensor& t) { return t.detach().to(torch::kBFloat16).to(torch::kDouble); };
  auto qd = bf16_values(q).requires_grad_(), kd = bf16_values(k).requires_grad_(), vd = bf16_values(v).requires_grad_();
  auto t = [](const torch::Tensor& x) { return x.transpose(1, 2); };
  const auto p = torch::softmax(torch::matmul(t(qd), t(kd).transpose(-1, -2)) / 4.0, -1);
  const auto od = torch::matmul(p, t(vd)).transpose(1, 2).reshape({2, 40, 64});
  EXPECT_LT(rel(o, od.detach()), 6e-3);
  const auto r = torch::randn(o.sizes());
  (o.to(torch::kFloat) * r).sum().backward();
  (od * r.to(torch::kDouble)).sum().backward();
  EXPECT_EQ(q.grad().scalar_type(), torch::kFloat);
  EXPECT_EQ(k.grad().scalar_type(), torch::kBFloat16);
  EXPECT_LT(rel(q.grad(), qd.grad()), 1e-2);
  EXPECT_LT(rel(k.grad(), kd.grad()), 1e-2);
  EXPECT_LT(rel(v.grad(), vd.grad()), 1e-2);
}

TEST(Bf16Attention, TrainingStepNearFloat32Attention) {
  // A whole tiny bf16 step (Pico, hd 32) with the bf16 kernels against the same step with float32
  // attention: the loss and every gradient as close as bf16 attention allows.
  if (!kernels::cpu::bf16_attention_available()) GTEST_SKIP() << "neither AMX nor AVX512-BF16 on this CPU";
  test_util::TinyStepOptions opt;
  opt.bf16 = true;
  test_util::TinyStep bf16, f32;
  {
    const Mode automatic(CpuAttention::automatic);
    bf16 = test_util::tiny_step(opt);
  }
  {
    const Mode float32(CpuAttention::float32);
    f32 = test_util::tiny_step(opt);
  }
  EXPECT_NEAR(bf16.loss, f32.loss, 2e-3 * std::abs(f32.loss));
  ASSERT_EQ(bf16.grads.size(), f32.grads.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < f32.grads.size(); ++i) {
    diff += (bf16.grads[i] - f32.grads[i]).pow(2).sum().item<double>();
    norm += f32.grads[i].pow(2).sum().item<double>();
  }
  ASSERT_GT(norm, 0);
  EXPECT_LT(std::sqrt(diff / norm), 2e-2);
  EXPECT_GT(diff, 0);  // the step did take the other kernels
}
