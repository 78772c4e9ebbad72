// float32 attention on AVX-512 (kernels/attention_cpu.h, model/attention.cpp): both passes against
// attention written out in float64 (odd lengths, head sizes that are not multiples of 16, strided
// heads, more keys than fit a tile), against ATen's float32 attention, their one-line errors, and
// the model's attention and a whole training step through them. Skips on CPUs without AVX-512.
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

torch::Tensor heads(int64_t B, int64_t seq, int64_t H, int64_t hd) { return attention_test::heads(B, seq, H, hd, torch::kFloat); }

}  // namespace

TEST(CpuAttentionF32, PassesEqualAttentionInFloat64) {
  if (!kernels::cpu::avx512_attention_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(21);
  // The mixer's self-attention, a cross-attention over 77 caption tokens, odd lengths and head
  // sizes (the 16-wide tiles' edges), more keys than one tile, one query, the widest head, and
  // one wider than the forward pass's 8 vectors of output columns (two column chunks), with a
  // partial third 32-query block.
  // float32 arithmetic: measured about 1e-7 norm-wise.
  for (const AttentionShape s : {AttentionShape{2, 4, 256, 256, 32}, AttentionShape{2, 4, 64, 77, 32},
                                 AttentionShape{3, 2, 33, 5, 24}, AttentionShape{1, 2, 7, 300, 8},
                                 AttentionShape{2, 1, 1, 19, 40}, AttentionShape{1, 2, 17, 17, 128},
                                 AttentionShape{1, 1, 70, 9, 144}})
    expect_passes_near_float64(s, torch::kFloat, kernels::cpu::attention_forward_f32,
                               kernels::cpu::attention_backward_f32, {.lse = 1e-5, .values = 2e-6, .aten_lse = 1e-5});
}

TEST(CpuAttentionF32, OneLineErrors) {
  const auto q = heads(1, 8, 2, 16), k = heads(1, 8, 2, 16);
  const auto lse = torch::zeros({1, 2, 8});
  if (!kernels::cpu::avx512_attention_available()) {
    const auto e = what_of([&] { kernels::cpu::attention_forward_f32(q, k, k, 0.25); });
    EXPECT_NE(e.find("no AVX-512"), std::string::npos) << e;
    GTEST_SKIP() << "no AVX-512 on this CPU";
  }
  auto expect = [](const std::function<void()>& f, const std::string& what) {
    expect_one_line_error(f, "CPU float32 attention: ", what);
  };
  const auto d = q.to(torch::kDouble);
  expect([&] { kernels::cpu::attention_forward_f32(d, k, k, 0.25); }, "float32 CPU tensors");
  expect([&] { kernels::cpu::attention_forward_f32(q, k, k, 0.0); }, "scale");
  expect([&] { kernels::cpu::attention_forward_f32(q, heads(1, 8, 2, 32), k, 0.25); }, "(B, H, L, hd)");
  expect([&] { kernels::cpu::attention_forward_f32(torch::randn({1, 2, 16, 8}).transpose(2, 3), k, k, 0.25); },
         "contiguous rows");
  expect([&] { kernels::cpu::attention_backward_f32(q, k, k, q, torch::zeros({1, 8, 2}), q, 0.25); }, "lse");
  expect([&] { kernels::cpu::attention_backward_f32(q, k, k, heads(1, 9, 2, 16), lse, q, 0.25); }, "q's shape");
  expect([&] { kernels::cpu::attention_backward_f32(q, k, k, q, lse, q.to(torch::kBFloat16), 0.25); }, "float32");
}

TEST(CpuAttentionF32, ModelAttentionEqualsAtenAttention) {
  // In float32 multi_head_attention takes microdit's kernels: ATen's float32 attention's output
  // and gradients to float32's rounding, the same bits with and without gradients (a
  // checkpointed block's forward runs without them and its recomputation with them).
  if (!kernels::cpu::avx512_attention_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(22);
  const auto q0 = torch::randn({2, 40, 4, 24}), k0 = torch::randn({2, 23, 4, 24}), v0 = torch::randn({2, 23, 4, 24});
  const auto r = torch::randn({2, 40, 96});
  struct Out {
    torch::Tensor o, o_no_grad, dq, dk, dv;
  };
  auto run = [&](CpuAttention mode) {
    const Mode m(mode);
    EXPECT_EQ(cpu_attention_kernel(24), mode == CpuAttention::float32 ? CpuAttentionKernel::float32
                                                                      : CpuAttentionKernel::aten_float32);
    auto q = q0.clone().requires_grad_(), k = k0.clone().requires_grad_(), v = v0.clone().requires_grad_();
    Out out;
    out.o = multi_head_attention(q, k, v);  // (B, N, H * hd)
    {
      torch::NoGradGuard ng;
      out.o_no_grad = multi_head_attention(q, k, v);
    }
    (out.o * r).sum().backward();
    out.dq = q.grad(), out.dk = k.grad(), out.dv = v.grad();
    return out;
  };
  const Out ours = run(CpuAttention::float32), aten = run(CpuAttention::aten_float32);
  EXPECT_EQ(ours.o.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(ours.o.detach(), ours.o_no_grad));
  EXPECT_LT(rel(ours.o, aten.o), 2e-6);
  EXPECT_LT(rel(ours.dq, aten.dq), 2e-6);
  EXPECT_LT(rel(ours.dk, aten.dk), 2e-6);
  EXPECT_LT(rel(ours.dv, aten.dv), 2e-6);
  EXPECT_FALSE(torch::equal(ours.dq, aten.dq));  // the other kernels did run
}

TEST(CpuAttentionF32, TrainingStepsEqualAtenAttention) {
  // A whole tiny step (Pico, hd 32), float32 and under bf16 autocast (on CPUs with neither AMX nor AVX512-BF16, where
  // attention stays float32), with microdit's kernels against ATen's float32 attention.
  if (!kernels::cpu::avx512_attention_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  for (const bool bf16 : {false, true}) {
    if (bf16 && kernels::cpu::bf16_attention_available()) continue;  // Bf16Attention's tests
    SCOPED_TRACE(bf16 ? "bf16 autocast" : "float32");
    test_util::TinyStepOptions opt;
    opt.bf16 = bf16;
    test_util::TinyStep ours, aten;
    {
      const Mode float32(CpuAttention::float32);
      ours = test_util::tiny_step(opt);
    }
    {
      const Mode aten_float32(CpuAttention::aten_float32);
      aten = test_util::tiny_step(opt);
    }
    const double tol = bf16 ? 1e-2 : 1e-4;  // under autocast bf16 rounding of what follows
    EXPECT_NEAR(ours.loss, aten.loss, tol * std::abs(aten.loss));
    ASSERT_EQ(ours.grads.size(), aten.grads.size());
    double diff = 0, norm = 0;
    for (size_t i = 0; i < aten.grads.size(); ++i) {
      diff += (ours.grads[i] - aten.grads[i]).pow(2).sum().item<double>();
      norm += aten.grads[i].pow(2).sum().item<double>();
    }
    ASSERT_GT(norm, 0);
    EXPECT_LT(std::sqrt(diff / norm), tol);
    EXPECT_GT(diff, 0);  // the step did take the other kernels
  }
}

TEST(CpuAttentionF32, BitsDoNotDependOnLayout) {
  // The same values in another layout (contiguous heads instead of views of (B, N, H, hd)
  // products) give the same bits: the trainer's paths that lay them out differently (bf16
  // weight copies, recomputation) must agree to the bit.
  if (!kernels::cpu::avx512_attention_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(23);
  const auto q = heads(2, 64, 4, 32), k = heads(2, 77, 4, 32), v = heads(2, 77, 4, 32), g = heads(2, 64, 4, 32);
  const double scale = 1.0 / std::sqrt(32.0);
  auto run = [&](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& g) {
    auto [o, lse] = kernels::cpu::attention_forward_f32(q, k, v, scale);
    auto [dq, dk, dv] = kernels::cpu::attention_backward_f32(q, k, v, o, lse, g, scale);
    return std::vector<torch::Tensor>{o, lse, dq, dk, dv};
  };
  const auto a = run(q, k, v, g), b = run(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous()),
             c = run(q, k, v, g);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i], c[i])) << i;
    EXPECT_TRUE(torch::equal(a[i], b[i])) << i;
  }
}
