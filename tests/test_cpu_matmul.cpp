// float32 CPU products through oneDNN or microdit's own kernels (core/cpu_matmul.h,
// kernels/gemm_cpu.h): the same values and gradients as ATen's MKL path, the same errors, and
// ATen unchanged wherever those paths do not apply (other dtypes, autocast). The own kernels
// are also checked alone against float64 products, over the shapes and strides that reach
// them. The whole-model check is the parity CLI tests, which run on the default.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <optional>
#include <utility>
#include <string>
#include <torch/torch.h>

#include "core/autocast.h"
#include "core/cpu_matmul.h"
#include "core/cpu_workers.h"
#include "kernels/gemm_cpu.h"
#include "model/attention.h"
#include "model/layers.h"
#include "test_util.h"
#include "tiny_step.h"

using namespace microdit;
using namespace microdit::test_util;

namespace {

// Sets the process-wide choice for one scope.
struct MatmulMode : test_util::ScopedSetting<CpuMatmul> {
  explicit MatmulMode(CpuMatmul m) : ScopedSetting(cpu_fp32_matmul, set_cpu_fp32_matmul, m) {}
};

// microdit's own kernels for every product of a scope, however few its columns.
struct OwnEverywhere : test_util::ScopedSetting<int64_t> {
  OwnEverywhere() : ScopedSetting(own_min_columns, set_own_min_columns, 1) {}
};

// The modes other than MKL that this CPU can run.
std::vector<CpuMatmul> fast_modes() {
  std::vector<CpuMatmul> m{CpuMatmul::kOneDnn};
  if (kernels::cpu::gemm_f32_available()) m.push_back(CpuMatmul::kOwn);
  return m;
}

// From /proc/cpuinfo, apart from the code under test.
bool intel_cpu() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("vendor_id", 0) == 0) return line.find("GenuineIntel") != std::string::npos;
  return false;
}

double rel_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-30);
}

struct Grads {
  torch::Tensor y, gx, gw, gb;
};

// y = f(x, w, b); loss = sum(y * r) for a fixed random r, so every output element matters.
Grads run_linear(const torch::Tensor& x0, const torch::Tensor& w0, const torch::Tensor& b0) {
  auto x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_();
  auto b = b0.defined() ? b0.clone().requires_grad_() : torch::Tensor();
  auto y = microdit::linear(x, w, b);
  torch::manual_seed(7);
  (y * torch::randn(y.sizes())).sum().backward();
  return {y.detach(), x.grad(), w.grad(), b.defined() ? b.grad() : torch::Tensor()};
}

void expect_linear_matches(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                           CpuMatmul mode) {
  SCOPED_TRACE(cpu_matmul_name(mode));
  Grads fast, ref;
  {
    MatmulMode m(mode);
    OwnEverywhere own;
    ASSERT_TRUE(uses_onednn_fp32(x, w));
    fast = run_linear(x, w, b);
  }
  {
    MatmulMode m(CpuMatmul::kMkl);
    ASSERT_FALSE(uses_onednn_fp32(x, w));
    ref = run_linear(x, w, b);
  }
  ASSERT_EQ(fast.y.sizes(), ref.y.sizes());
  EXPECT_LT(rel_diff(fast.y, ref.y), 1e-5);
  EXPECT_LT(rel_diff(fast.gx, ref.gx), 1e-5);
  EXPECT_LT(rel_diff(fast.gw, ref.gw), 1e-5);
  if (b.defined()) {
    EXPECT_LT(rel_diff(fast.gb, ref.gb), 1e-5);
  }
}

}  // namespace

TEST(CpuMatmul, LinearEqualsAtenWithGradients) {
  torch::manual_seed(0);
  const auto w = torch::randn({48, 40}), b = torch::randn({48});
  for (const auto mode : fast_modes()) {
    expect_linear_matches(torch::randn({3, 17, 40}), w, b, mode);  // (B, T, K), bias
    expect_linear_matches(torch::randn({33, 40}), w, {}, mode);     // 2-D, no bias
    // A transposed (non-contiguous) input and weight, as views reach layers in the model.
    expect_linear_matches(torch::randn({40, 5, 9}).permute({1, 2, 0}), torch::randn({40, 48}).t(), b, mode);
    // Several of the own kernels' blocks of K (768 where x's rows are transposed into panels,
    // 256 for the weight's gradient), panels of 14 rows and 32 columns with tails.
    expect_linear_matches(torch::randn({2, 45, 1100}), torch::randn({70, 1100}), torch::randn({70}), mode);
  }
}

TEST(CpuMatmul, OnlyTheAskedGradients) {
  torch::manual_seed(1);
  auto x = torch::randn({6, 8}), w = torch::randn({4, 8}).requires_grad_();
  auto y = microdit::linear(x, w, {});
  y.sum().backward();
  EXPECT_FALSE(x.grad().defined());
  ASSERT_TRUE(w.grad().defined());
  EXPECT_LT(rel_diff(w.grad(), torch::ones({6, 4}).t().mm(x)), 1e-6);
}

TEST(CpuMatmul, BmmEqualsAtenWithGradients) {
  torch::manual_seed(2);
  const auto a0 = torch::randn({4, 19, 24}), b0 = torch::randn({4, 24, 31});
  auto grads = [&](CpuMatmul mode) {
    MatmulMode m(mode);
    OwnEverywhere own;
    auto a = a0.clone().requires_grad_(), b = b0.clone().requires_grad_();
    auto y = microdit::bmm(a, b);
    torch::manual_seed(3);
    (y * torch::randn(y.sizes())).sum().backward();
    return std::vector<torch::Tensor>{y.detach(), a.grad(), b.grad()};
  };
  const auto ref = grads(CpuMatmul::kMkl);
  for (const auto mode : fast_modes()) {
    const auto fast = grads(mode);
    for (size_t i = 0; i < fast.size(); ++i) {
      ASSERT_EQ(fast[i].sizes(), ref[i].sizes());
      EXPECT_LT(rel_diff(fast[i], ref[i]), 1e-5) << cpu_matmul_name(mode) << ", tensor " << i;
    }
  }
}

TEST(CpuMatmul, AtenWhereOneDnnDoesNotApply) {
  for (const auto mode : fast_modes()) {
    SCOPED_TRACE(cpu_matmul_name(mode));
    MatmulMode m(mode);
    // float64: ATen's own result, bit for bit.
    auto xd = torch::randn({5, 7}, torch::kDouble), wd = torch::randn({3, 7}, torch::kDouble);
    EXPECT_FALSE(uses_onednn_fp32(xd, wd));
    EXPECT_TRUE(torch::equal(microdit::linear(xd, wd), at::linear(xd, wd)));
    // Under autocast the product is bf16, as at::linear gives it.
    auto x = torch::randn({5, 7}), w = torch::randn({3, 7});
    {
      AutocastGuard ac(c10::kCPU, true);
      EXPECT_FALSE(uses_onednn_fp32(x, w));
      EXPECT_EQ(microdit::linear(x, w).scalar_type(), at::kBFloat16);
    }
    EXPECT_TRUE(uses_onednn_fp32(x, w));
    // Mismatched shapes: ATen's error, not a crash.
    EXPECT_THROW(microdit::linear(x, torch::randn({3, 6})), c10::Error);
    EXPECT_THROW(microdit::bmm(torch::randn({2, 3, 4}), torch::randn({2, 5, 6})), c10::Error);
  }
}

TEST(CpuMatmul, NamesAndLinearModule) {
  EXPECT_EQ(parse_cpu_matmul("onednn"), CpuMatmul::kOneDnn);
  EXPECT_EQ(parse_cpu_matmul("mkl"), CpuMatmul::kMkl);
  if (kernels::cpu::gemm_f32_available()) {
    EXPECT_EQ(parse_cpu_matmul("microdit"), CpuMatmul::kOwn);
  }
  EXPECT_EQ(cpu_matmul_name(CpuMatmul::kOwn), std::string("microdit"));
  EXPECT_EQ(error_of([] { parse_cpu_matmul("blas"); }),
            "--cpu-matmul: expected auto, onednn, mkl or microdit, got 'blas'");
  // auto: microdit's kernels on CPUs with AVX-512, else MKL on Intel CPUs and oneDNN on the
  // others; it is also the process's default.
  const bool intel = intel_cpu();
  const auto fallback = intel ? CpuMatmul::kMkl : CpuMatmul::kOneDnn;
  EXPECT_EQ(parse_cpu_matmul("auto"), kernels::cpu::gemm_f32_available() ? CpuMatmul::kOwn : fallback);
  EXPECT_EQ(default_cpu_fp32_matmul(), parse_cpu_matmul("auto"));
  // microdit::Linear draws torch::nn::Linear's initial values and is still seen as one.
  torch::manual_seed(4);
  auto ours = make_linear(6, 5, true);
  torch::manual_seed(4);
  torch::nn::Linear theirs(6, 5);
  EXPECT_TRUE(torch::equal(ours->weight, theirs->weight));
  EXPECT_TRUE(torch::equal(ours->bias, theirs->bias));
  torch::nn::Module& as_module = *ours;
  EXPECT_NE(as_module.as<torch::nn::LinearImpl>(), nullptr);
}

// Under --cpu-matmul microdit, the products too narrow for microdit's kernels (fewer than 256
// columns) go to MKL on Intel CPUs and to oneDNN on the others, where MKL runs generic kernels:
// their bits are that library's, forward and backward.
TEST(CpuMatmul, NarrowProductsInOwnModeTakeTheCpusLibrary) {
  if (!kernels::cpu::gemm_f32_available()) GTEST_SKIP() << "no AVX-512: --cpu-matmul microdit is unavailable";
  ASSERT_EQ(own_min_columns(), kOwnMinColumns);
  torch::manual_seed(3);
  const auto x = torch::randn({2, 150, 200}), w = torch::randn({96, 200}), b = torch::randn({96});
  const auto a = torch::randn({3, 150, 200}), m = torch::randn({3, 200, 96});
  const auto library = intel_cpu() ? CpuMatmul::kMkl : CpuMatmul::kOneDnn;
  Grads own, lib;
  torch::Tensor own_bmm, lib_bmm;
  {
    MatmulMode mode(CpuMatmul::kOwn);
    own = run_linear(x, w, b);
    own_bmm = microdit::bmm(a, m);
  }
  {
    MatmulMode mode(library);
    lib = run_linear(x, w, b);
    lib_bmm = microdit::bmm(a, m);
  }
  EXPECT_TRUE(torch::equal(own.y, lib.y));
  EXPECT_TRUE(torch::equal(own.gx, lib.gx));
  EXPECT_TRUE(torch::equal(own.gw, lib.gw));
  EXPECT_TRUE(torch::equal(own_bmm, lib_bmm));
  // And the two libraries do differ in their last bits here, so the check above can fail.
  MatmulMode other(library == CpuMatmul::kMkl ? CpuMatmul::kOneDnn : CpuMatmul::kMkl);
  EXPECT_FALSE(torch::equal(run_linear(x, w, b).y, lib.y));
}

TEST(CpuMatmul, TrainingStepMatchesMkl) {
  // A whole tiny MicroDiT step (forward, loss, backward) on both paths: the same loss and
  // gradients up to float rounding.
  TinyStep ref;
  {
    MatmulMode m(CpuMatmul::kMkl);
    ref = tiny_step(TinyStepOptions{});
  }
  ASSERT_GT(largest_gradient(ref), 1e-4);
  for (const auto mode : fast_modes()) {
    SCOPED_TRACE(cpu_matmul_name(mode));
    MatmulMode m(mode);
    OwnEverywhere own;
    const auto fast = tiny_step(TinyStepOptions{});
    EXPECT_NEAR(fast.loss, ref.loss, 1e-5 * std::abs(ref.loss));
    EXPECT_LT(worst_relative(fast, ref), 1e-4);
  }
}

// kernels/gemm_cpu.h alone against float64 products: both layouts of each operand (and one
// with neither stride 1), tails of every block (rows of 14, columns of 32 and of 1024, K of
// 256 and 768), accumulation and bias, on one thread and on two.
TEST(GemmF32, EqualsFloat64Products) {
  if (!kernels::cpu::gemm_f32_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(11);
  struct Shape {
    int64_t M, N, K;
  };
  const std::vector<Shape> shapes{{1, 1, 1},     {14, 32, 256},  {15, 33, 257},  {13, 31, 5},   {29, 1030, 70},
                                  {100, 64, 800}, {3, 300, 1600}, {60, 17, 0},    {200, 256, 1}};
  for (const int threads : {1, 2}) {
    const int was = at::get_num_threads();
    at::set_num_threads(threads);
    for (const auto& s : shapes) {
      for (const int layout : {0, 1, 2, 3, 4}) {  // bit 0: A transposed, bit 1: B transposed; 4: strided A
        SCOPED_TRACE(::testing::Message() << s.M << "x" << s.N << "x" << s.K << " layout " << layout << " threads "
                                          << threads);
        // A (M, K) and B (K, N) as views of contiguous storage in the asked layout.
        auto A = layout & 1 ? torch::randn({s.K, s.M}).t() : torch::randn({s.M, s.K});
        if (layout == 4) A = torch::randn({s.M, s.K, 2}).select(2, 1);  // strides (2K, 2)
        auto B = layout & 2 ? torch::randn({s.N, s.K}).t() : torch::randn({s.K, s.N});
        const auto bias = torch::randn({s.N});
        const auto ref = A.to(torch::kDouble).mm(B.to(torch::kDouble));
        for (const bool accumulate : {false, true}) {
          for (const bool with_bias : {false, true}) {
            auto C = torch::randn({s.M, s.N + 3}).narrow(1, 0, s.N);  // row stride N + 3
            const auto before = C.clone();
            kernels::cpu::gemm_f32(s.M, s.N, s.K, {A.data_ptr<float>(), A.stride(0), A.stride(1)},
                                   {B.data_ptr<float>(), B.stride(0), B.stride(1)}, C.data_ptr<float>(), C.stride(0),
                                   accumulate, with_bias ? bias.data_ptr<float>() : nullptr);
            auto want = ref.clone();
            if (accumulate) want += before.to(torch::kDouble);
            if (with_bias) want += bias.to(torch::kDouble);
            // float32 rounding of K terms of size ~1 (a wrong element is off by ~sqrt(K)).
            EXPECT_LT((C.to(torch::kDouble) - want).abs().max().item<double>(), 3e-7 * static_cast<double>(s.K) + 1e-5)
                << "accumulate " << accumulate << " bias " << with_bias;
          }
        }
      }
    }
    at::set_num_threads(was);
  }
}

// kernels/gemm_cpu.h's bf16 products alone against float64 products of the operands rounded to
// bf16: float32 and bf16 operands in both layouts (and one with neither stride 1), tails of
// rows (14), columns (32 and 1024) and an odd K, a bf16 or float32 C, accumulation and a bias
// (rounded to bf16 like the operands), on one thread and on two.
TEST(GemmBf16, EqualsFloat64ProductsOfRoundedOperands) {
  if (!kernels::cpu::gemm_bf16_available()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  torch::manual_seed(12);
  struct Shape {
    int64_t M, N, K;
  };
  const std::vector<Shape> shapes{{1, 1, 1}, {14, 32, 32}, {15, 33, 33}, {13, 31, 5}, {29, 1030, 70}, {100, 64, 301},
                                  {60, 17, 0}};
  const auto r = [](const torch::Tensor& t) { return t.to(torch::kBFloat16).to(torch::kDouble); };
  for (const int threads : {1, 2}) {
    const int was = at::get_num_threads();
    at::set_num_threads(threads);
    for (const auto& s : shapes) {
      for (const int layout : {0, 1, 2, 3, 4}) {  // bit 0: A transposed, bit 1: B transposed; 4: strided A
        for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
          SCOPED_TRACE(::testing::Message() << s.M << "x" << s.N << "x" << s.K << " layout " << layout << " threads "
                                            << threads << " " << dtype);
          auto A = layout & 1 ? torch::randn({s.K, s.M}).t() : torch::randn({s.M, s.K});
          if (layout == 4) A = torch::randn({s.M, s.K, 2}).select(2, 1);  // strides (2K, 2)
          auto B = layout & 2 ? torch::randn({s.N, s.K}).t() : torch::randn({s.K, s.N});
          A = A.to(dtype);
          B = B.to(dtype);
          const auto bias = torch::randn({s.N});
          const auto ref = r(A).mm(r(B));
          const auto scale = r(A).abs().mm(r(B).abs());  // what float32 sums are rounded against
          const bool bf16 = dtype == torch::kBFloat16;
          const kernels::cpu::AnyMatrix a{A.data_ptr(), A.stride(0), A.stride(1), bf16};
          const kernels::cpu::AnyMatrix b{B.data_ptr(), B.stride(0), B.stride(1), bf16};
          for (const bool accumulate : {false, true}) {
            for (const bool with_bias : {false, true}) {
              auto want = ref.clone();
              if (with_bias) want += r(bias);
              {  // float32 C, row stride N + 3
                auto C = torch::randn({s.M, s.N + 3}).narrow(1, 0, s.N);
                const auto before = C.clone();
                kernels::cpu::gemm_bf16(s.M, s.N, s.K, a, b, C.data_ptr(), kernels::cpu::Bf16Out::kFloat, C.stride(0), accumulate,
                                        with_bias ? bias.data_ptr<float>() : nullptr);
                auto w = want + (accumulate ? before.to(torch::kDouble) : torch::zeros_like(want));
                EXPECT_LE(((C.to(torch::kDouble) - w).abs() - 1e-6 * (scale + w.abs())).max().item<double>(), 0.0)
                    << "float32 C, accumulate " << accumulate << " bias " << with_bias;
              }
              if (!accumulate) {  // bf16 C: the float32 result rounded once
                auto C = torch::empty({s.M, s.N + 5}, torch::kBFloat16).narrow(1, 0, s.N);
                kernels::cpu::gemm_bf16(s.M, s.N, s.K, a, b, C.data_ptr(), kernels::cpu::Bf16Out::kBf16, C.stride(0),
                                        false, with_bias ? bias.data_ptr<float>() : nullptr);
                EXPECT_LE(((C.to(torch::kDouble) - want).abs() - (1.0 / 256) * want.abs() - 1e-6 * scale)
                              .max()
                              .item<double>(),
                          0.0)
                    << "bf16 C, bias " << with_bias;
                // float32 C holding the bf16 values: the same bits as the bf16 C, widened.
                auto F = torch::empty({s.M, s.N});
                kernels::cpu::gemm_bf16(s.M, s.N, s.K, a, b, F.data_ptr(), kernels::cpu::Bf16Out::kFloatOfBf16, s.N,
                                        true, with_bias ? bias.data_ptr<float>() : nullptr);
                EXPECT_TRUE(torch::equal(F, C.to(torch::kFloat)));
              }
            }
          }
        }
      }
    }
    at::set_num_threads(was);
  }
}

// Rounding as a cast rounds: to nearest, ties to even, in every packing path (vector and
// scalar) and for the bias. 1 + 2^-8 lies halfway between bf16's 1 and 1 + 2^-7 (goes down, to
// the even one), 1 + 3 * 2^-8 halfway between 1 + 2^-7 and 1 + 2^-6 (goes up).
TEST(GemmBf16, RoundsTiesToEvenLikeACast) {
  if (!kernels::cpu::gemm_bf16_available()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  const float down = 1.0f + 1.0f / 256, up = 1.0f + 3.0f / 256;
  const auto values = torch::tensor({{down, up}, {-up, -down}});  // A (2, 2)
  const auto eye = torch::eye(2);
  const auto want = values.to(torch::kBFloat16).to(torch::kFloat);
  ASSERT_EQ(want[0][0].item<float>(), 1.0f);
  ASSERT_EQ(want[0][1].item<float>(), 1.0f + 1.0f / 64);
  for (const int layout : {0, 1, 2}) {  // rows contiguous in K, columns contiguous, neither
    SCOPED_TRACE(layout);
    auto A = layout == 1 ? values.t().contiguous().t() : values.contiguous();
    if (layout == 2) A = torch::stack({values, values}, 2).select(2, 0);
    auto C = torch::empty({2, 2});
    kernels::cpu::gemm_bf16(2, 2, 2, {A.data_ptr(), A.stride(0), A.stride(1), false},
                            {eye.data_ptr(), eye.stride(0), eye.stride(1), false}, C.data_ptr(), kernels::cpu::Bf16Out::kFloat, 2, false, nullptr);
    EXPECT_TRUE(torch::equal(C, want)) << C;
    // B likewise (A the identity), and the bias: C = I I + bias.
    C = torch::empty({2, 2});
    kernels::cpu::gemm_bf16(2, 2, 2, {eye.data_ptr(), 2, 1, false}, {A.data_ptr(), A.stride(0), A.stride(1), false},
                            C.data_ptr(), kernels::cpu::Bf16Out::kFloat, 2, false, nullptr);
    EXPECT_TRUE(torch::equal(C, want)) << C;
  }
  const auto bias = torch::tensor({down, up});
  auto C = torch::empty({1, 2});
  const auto zero = torch::zeros({1, 1});
  kernels::cpu::gemm_bf16(1, 2, 1, {zero.data_ptr(), 1, 1, false}, {eye.data_ptr(), 2, 1, false}, C.data_ptr(),
                          kernels::cpu::Bf16Out::kFloat, 2, false, bias.data_ptr<float>());
  EXPECT_TRUE(torch::equal(C[0], want[0])) << C;
}

namespace {

// f(x, w, b) under CPU bf16 autocast with float32 leaves, loss = sum(y * r), on the own bf16
// products (kOwn) or autocast's casts and oneDNN (kOneDnn); with `packed`, w and b registered
// with a PackedWeights scope (core/cpu_matmul.h).
Grads run_autocast(const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>& f,
                   const torch::Tensor& x0, const torch::Tensor& w0, const torch::Tensor& b0, CpuMatmul mode,
                   bool packed = false) {
  MatmulMode m(mode);
  auto x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_();
  auto b = b0.defined() ? b0.clone().requires_grad_() : torch::Tensor();
  std::optional<PackedWeights> scope;
  if (packed) scope.emplace(std::vector<torch::Tensor>{w, b});
  torch::Tensor y;
  {
    AutocastGuard ac(c10::kCPU, true);
    y = f(x, w, b);
  }
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(y.grad_fn());  // which path ran: the own products' Functions, or ATen's backward nodes
  if (y.grad_fn()) {
    EXPECT_EQ(y.grad_fn()->name().find("Bf16Fn") != std::string::npos, mode == CpuMatmul::kOwn) << y.grad_fn()->name();
  }
  torch::manual_seed(7);
  (y.to(torch::kFloat) * torch::randn(y.sizes())).sum().backward();
  return {y.detach(), x.grad(), w.grad(), b.defined() ? b.grad() : torch::Tensor()};
}

// The two products as run_autocast calls them: f(x, w, b).
torch::Tensor lin(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) { return microdit::linear(x, w, b); }
torch::Tensor bmm_aw(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor&) { return microdit::bmm(a, w); }

void expect_autocast_matches(const Grads& own, const Grads& ref) {
  ASSERT_EQ(own.y.sizes(), ref.y.sizes());
  // Both round the same float32 sums to bf16 (summed in another order): at most a unit apart.
  EXPECT_LT(rel_diff(own.y.to(torch::kFloat), ref.y.to(torch::kFloat)), 1.0 / 128);
  // The gradients: bf16 products cast back on both paths (summed in another order).
  for (const auto& [mine, theirs] : {std::pair{own.gx, ref.gx}, std::pair{own.gw, ref.gw}, std::pair{own.gb, ref.gb}}) {
    if (!theirs.defined()) continue;
    ASSERT_TRUE(mine.defined());
    EXPECT_EQ(mine.scalar_type(), theirs.scalar_type());
    EXPECT_LT(rel_diff(mine, theirs), 1.0 / 64);
  }
}

}  // namespace

// Under CPU bf16 autocast on AVX512-BF16 CPUs without AMX, microdit::linear and microdit::bmm
// multiply through gemm_bf16 (no casts, no oneDNN): autocast's bf16 result, and the gradients of
// the float32 leaves in float32 (the result's autograd node tells which path ran).
TEST(CpuMatmul, Bf16ProductsUnderAutocastMatchAutocast) {
  if (!own_bf16_products()) GTEST_SKIP() << "this CPU's bf16 products stay with oneDNN (no AVX512-BF16, or AMX)";
  torch::manual_seed(13);
  const auto w = torch::randn({48, 40}) * 0.2, b = torch::randn({48});
  for (const auto& x : {torch::randn({3, 17, 40}), torch::randn({40, 5, 9}).permute({1, 2, 0})}) {
    for (const bool with_bias : {true, false}) {
      SCOPED_TRACE(::testing::Message() << x.sizes() << " bias " << with_bias);
      const auto bb = with_bias ? b : torch::Tensor();
      expect_autocast_matches(run_autocast(lin, x, w, bb, CpuMatmul::kOwn), run_autocast(lin, x, w, bb, CpuMatmul::kOneDnn));
    }
  }
  // A transposed weight (as the model passes W^T views) and an odd depth.
  const auto xo = torch::randn({30, 33}), wt = torch::randn({33, 20}).t(), bo = b.narrow(0, 0, 20);
  expect_autocast_matches(run_autocast(lin, xo, wt, bo, CpuMatmul::kOwn), run_autocast(lin, xo, wt, bo, CpuMatmul::kOneDnn));
  const auto a = torch::randn({4, 29, 24}), we = torch::randn({4, 24, 40});
  expect_autocast_matches(run_autocast(bmm_aw, a, we, {}, CpuMatmul::kOwn), run_autocast(bmm_aw, a, we, {}, CpuMatmul::kOneDnn));
  expect_autocast_matches(run_autocast(bmm_aw, a, we.transpose(1, 2).contiguous().transpose(1, 2), {}, CpuMatmul::kOwn),
                          run_autocast(bmm_aw, a, we, {}, CpuMatmul::kOneDnn));
  // bf16 operands (the weight copies of --bf16-weights): bf16 gradients, as autocast gives them.
  const auto xb = torch::randn({7, 40}).to(torch::kBFloat16), wb = w.to(torch::kBFloat16);
  expect_autocast_matches(run_autocast(lin, xb, wb, b.to(torch::kBFloat16), CpuMatmul::kOwn),
                          run_autocast(lin, xb, wb, b.to(torch::kBFloat16), CpuMatmul::kOneDnn));
}

TEST(CpuMatmul, Bf16TrainingStepMatchesAutocast) {
  // A whole tiny MicroDiT step under bf16 autocast on the own bf16 products and on autocast's
  // oneDNN path: the same loss and gradients up to bf16 rounding.
  if (!own_bf16_products()) GTEST_SKIP() << "this CPU's bf16 products stay with oneDNN (no AVX512-BF16, or AMX)";
  TinyStepOptions o;
  o.bf16 = true;
  TinyStep ref;
  {
    MatmulMode m(CpuMatmul::kOneDnn);
    ref = tiny_step(o);
  }
  ASSERT_GT(largest_gradient(ref), 1e-4);
  MatmulMode m(CpuMatmul::kOwn);
  const auto own = tiny_step(o);
  EXPECT_NEAR(own.loss, ref.loss, 1e-2 * std::abs(ref.loss));
  EXPECT_LT(worst_relative(own, ref), 5e-2);
}

namespace {

void expect_same_bits(const Grads& a, const Grads& b) {
  for (const auto& [x, y] : {std::pair{a.y, b.y}, std::pair{a.gx, b.gx}, std::pair{a.gw, b.gw}, std::pair{a.gb, b.gb}}) {
    ASSERT_EQ(x.defined(), y.defined());
    if (x.defined()) {
      EXPECT_TRUE(torch::equal(x, y)) << (x.to(torch::kFloat) - y.to(torch::kFloat)).abs().max();
    }
  }
}

}  // namespace

// Weights packed once for many products (PackedWeights): the forward product (x W^T), the
// input's gradient (dY W) and the expert products (a @ W, dY @ W^T) read the packs, and give
// the values of packing at every product, bit for bit.
TEST(CpuMatmul, PackedWeightsGiveTheSameBits) {
  if (!own_bf16_products()) GTEST_SKIP() << "this CPU's bf16 products stay with oneDNN (no AVX512-BF16, or AMX)";
  torch::manual_seed(17);
  // 1,100 columns: more than one of the kernels' column blocks of 1,024; an odd depth.
  for (const auto& [x, w] : {std::pair{torch::randn({3, 17, 40}), torch::randn({48, 40}) * 0.2},
                             std::pair{torch::randn({30, 33}), torch::randn({1100, 33}) * 0.2},
                             std::pair{torch::randn({9, 64}), torch::randn({33, 64}).t().contiguous().t() * 1.0}}) {
    for (const bool with_bias : {true, false}) {
      SCOPED_TRACE(::testing::Message() << x.sizes() << " " << w.sizes() << " bias " << with_bias);
      const auto b = with_bias ? torch::randn({w.size(0)}) : torch::Tensor();
      const auto before = packed_weight_stats();
      const auto packed = run_autocast(lin, x, w, b, CpuMatmul::kOwn, true);
      const auto after = packed_weight_stats();
      expect_same_bits(packed, run_autocast(lin, x, w, b, CpuMatmul::kOwn));
      // Two layouts packed (W^T for y, W for x's gradient), none held once the scope ended.
      EXPECT_EQ(after.packs - before.packs, 2);
      EXPECT_EQ(after.lookups - before.lookups, 2);
      EXPECT_EQ(packed_weight_stats().bytes, 0);
    }
  }
  const auto a = torch::randn({4, 29, 24}), we = torch::randn({4, 24, 40});
  const auto before = packed_weight_stats();
  expect_same_bits(run_autocast(bmm_aw, a, we, {}, CpuMatmul::kOwn, true), run_autocast(bmm_aw, a, we, {}, CpuMatmul::kOwn));
  EXPECT_EQ(packed_weight_stats().packs - before.packs, 2);  // W for the product, W^T for a's gradient
}

// Within one scope a pack is made once and read by every product with that weight (the CPU
// workers of a training step), and a weight changed in place meanwhile is packed again.
TEST(CpuMatmul, PackedWeightsAreReusedAndFollowInPlaceChanges) {
  if (!own_bf16_products()) GTEST_SKIP() << "this CPU's bf16 products stay with oneDNN (no AVX512-BF16, or AMX)";
  MatmulMode m(CpuMatmul::kOwn);
  torch::manual_seed(3);
  auto w = torch::randn({64, 32}).requires_grad_();
  const auto x = torch::randn({2, 16, 32});
  torch::NoGradGuard no_grad;
  AutocastGuard ac(c10::kCPU, true);
  const auto plain = microdit::linear(x, w);
  torch::Tensor changed;
  {
    const PackedWeights scope({w});
    const auto before = packed_weight_stats();
    std::vector<torch::Tensor> y(4);
    run_cpu_workers(2, 4, [&](int64_t k) { y[k] = microdit::linear(x, w); });
    for (const auto& t : y) EXPECT_TRUE(torch::equal(t, plain));
    EXPECT_EQ(packed_weight_stats().packs - before.packs, 1);
    EXPECT_EQ(packed_weight_stats().lookups - before.lookups, 4);
    EXPECT_GT(packed_weight_stats().bytes, 0);
    w.add_(0.5);  // an in-place change: the version counter moves
    changed = microdit::linear(x, w);
    EXPECT_EQ(packed_weight_stats().packs - before.packs, 2);
  }
  EXPECT_EQ(packed_weight_stats().bytes, 0);
  const auto unpacked = microdit::linear(x, w);  // no scope: packed by the product
  EXPECT_FALSE(torch::equal(changed, plain));
  EXPECT_TRUE(torch::equal(changed, unpacked));
  // The ended scope's pack storage is kept, and the next scope's pack of the same size takes it
  // (a training step reuses the previous step's) and fills it anew.
  const auto spare = packed_weight_stats().spare_bytes;
  EXPECT_GT(spare, 0);
  w.add_(0.25);
  torch::Tensor again;
  {
    const PackedWeights scope({w});
    again = microdit::linear(x, w);
    EXPECT_LT(packed_weight_stats().spare_bytes, spare);
  }
  EXPECT_TRUE(torch::equal(again, microdit::linear(x, w)));  // the new values, not the old pack's
  EXPECT_EQ(packed_weight_stats().spare_bytes, spare);        // taken and given back, not added to
  // A scope of another shape: the spares it did not take are freed as it ends, not kept beside its own.
  const auto w2 = torch::randn({100, 32});
  {
    const PackedWeights other({w2});
    (void)microdit::linear(x, w2);
  }
  EXPECT_EQ(packed_weight_stats().spare_bytes, kernels::cpu::packed_bf16_bytes(32, 100));
}

TEST(CpuAttention, Float32UnderAutocast) {
  // Without AMX ATen's bf16 attention is the slow one on the CPU, so under autocast attention
  // runs in float32 (model/attention.cpp): the result is float32 SDPA of the inputs rounded to
  // bf16 (as autocast would have cast them), and the gradients are attention's, in the inputs'
  // dtypes. (Head size 8 keeps `auto` at float32 on AMX CPUs too; the setting makes it sure.)
  const test_util::ScopedSetting mode(cpu_attention, set_cpu_attention, CpuAttention::float32);
  torch::manual_seed(5);
  auto q = torch::randn({2, 6, 4, 8}).to(torch::kBFloat16).requires_grad_();  // (B, N, H, hd)
  auto k = torch::randn({2, 5, 4, 8}).requires_grad_();                       // float32, as LN gives
  auto v = torch::randn({2, 5, 4, 8}).to(torch::kBFloat16).requires_grad_();
  torch::Tensor o;
  {
    AutocastGuard ac(c10::kCPU, true);
    o = multi_head_attention(q, k, v);  // (B, N, H * hd)
  }
  EXPECT_EQ(o.scalar_type(), torch::kFloat);
  auto bf16_values = [](const torch::Tensor& t) { return t.detach().to(torch::kBFloat16).to(torch::kDouble); };
  auto qd = bf16_values(q).requires_grad_(), kd = bf16_values(k).requires_grad_(), vd = bf16_values(v).requires_grad_();
  auto f = [](const torch::Tensor& t) { return t.to(torch::kFloat).transpose(1, 2); };
  auto expect = at::scaled_dot_product_attention(f(qd.detach()), f(kd.detach()), f(vd.detach()))
                    .transpose(1, 2).reshape({2, 6, 32});
  EXPECT_TRUE(torch::allclose(o.detach(), expect, 1e-6, 1e-6));
  // Against attention written out in float64 on the same (rounded) values.
  auto t = [](const torch::Tensor& x) { return x.transpose(1, 2); };  // (B, H, N, hd)
  auto p = torch::softmax(torch::matmul(t(qd), t(kd).transpose(-1, -2)) / std::sqrt(8.0), -1);
  auto od = torch::matmul(p, t(vd)).transpose(1, 2).reshape({2, 6, 32});
  EXPECT_LT((od.detach().to(torch::kFloat) - o.detach()).abs().max().item<double>(), 1e-5);
  auto r = torch::randn(o.sizes());
  (o * r).sum().backward();
  (od * r.to(torch::kDouble)).sum().backward();
  EXPECT_EQ(q.grad().scalar_type(), torch::kBFloat16);
  EXPECT_EQ(k.grad().scalar_type(), torch::kFloat);
  auto close = [](const torch::Tensor& a, const torch::Tensor& b) {  // bf16-rounded gradients
    return (a.to(torch::kDouble) - b).abs().max().item<double>() <= 1e-2 * b.abs().max().item<double>();
  };
  EXPECT_TRUE(close(q.grad(), qd.grad()));
  EXPECT_TRUE(close(k.grad(), kd.grad()));
  EXPECT_TRUE(close(v.grad(), vd.grad()));
}

TEST(CpuAttention, Bf16WithoutAutocastStaysBf16) {
  // A bf16 model run without autocast gets bf16 attention output, as from ATen's attention,
  // so its bf16 output projection can take it.
  auto q = torch::randn({2, 6, 4, 8}).to(torch::kBFloat16), k = torch::randn({2, 5, 4, 8}).to(torch::kBFloat16),
       v = torch::randn({2, 5, 4, 8}).to(torch::kBFloat16);
  const auto o = multi_head_attention(q, k, v);
  EXPECT_EQ(o.scalar_type(), torch::kBFloat16);
  auto t = [](const torch::Tensor& x) { return x.transpose(1, 2); };
  const auto ref = at::scaled_dot_product_attention(t(q), t(k), t(v)).transpose(1, 2).reshape({2, 6, 32});
  EXPECT_LT((o.to(torch::kFloat) - ref.to(torch::kFloat)).abs().max().item<double>(), 2e-2);
}

// GELU inside the own kernels' products (the expert-choice MoE's experts): the same output and
// gradients as LibTorch's gelu and bmm, in float64 as the reference. GELU's tails and its
// negative side are both exercised (a ~ 2 N(0, 1)).
TEST(GemmF32, GeluBmmEqualsGeluThenBmm) {
  if (!kernels::cpu::gemm_f32_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  MatmulMode m(CpuMatmul::kOwn);
  OwnEverywhere own;
  torch::manual_seed(12);
  // d = 800: a's gradient takes two blocks of K, GELU' applied after the second.
  for (const int64_t d : {33, 800}) {
    SCOPED_TRACE(d);
    const auto a0 = 2 * torch::randn({3, 45, 70}), w0 = torch::randn({3, 70, d}) / 8, r = torch::randn({3, 45, d});
    ASSERT_TRUE(gelu_bmm_fused_applies(a0, w0));
    EXPECT_FALSE(gelu_bmm_fused_applies(a0.transpose(1, 2).contiguous().transpose(1, 2), w0));  // a not contiguous
    auto a = a0.clone().requires_grad_(), w = w0.clone().requires_grad_();
    auto y = gelu_bmm_fused(a, w);
    (y * r).sum().backward();
    auto ad = a0.to(torch::kDouble).requires_grad_(), wd = w0.to(torch::kDouble).requires_grad_();
    auto yd = at::bmm(at::gelu(ad), wd);
    (yd * r.to(torch::kDouble)).sum().backward();
    auto worst = [](const torch::Tensor& x, const torch::Tensor& ref) {
      return (x.to(torch::kDouble) - ref).abs().max().item<double>() / ref.abs().max().item<double>();
    };
    EXPECT_LT(worst(y.detach(), yd.detach()), 2e-6);
    EXPECT_LT(worst(a.grad(), ad.grad()), 2e-6);
    EXPECT_LT(worst(w.grad(), wd.grad()), 2e-6);
    // Without gradients (sampling) the same values.
    torch::NoGradGuard no_grad;
    EXPECT_LT(worst(gelu_bmm_fused(a0, w0), yd.detach()), 2e-6);
  }
}

// GELU as the own kernels store a product (the experts' first product when sampling): GELU(a @ w)
// against LibTorch's gelu of the float64 product, a partial last tile of 50 columns included; only
// where autograd does not record.
TEST(GemmF32, BmmGeluEqualsBmmThenGelu) {
  if (!kernels::cpu::gemm_f32_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  MatmulMode m(CpuMatmul::kOwn);
  OwnEverywhere own;
  torch::manual_seed(13);
  for (const int64_t K : {70, 800}) {  // 800: two blocks of K (768 deep), GELU after the second
    SCOPED_TRACE(K);
    const auto a = torch::randn({3, 45, K}), w = 2 * torch::randn({3, K, 50}) / std::sqrt(static_cast<double>(K));
    EXPECT_FALSE(bmm_gelu_applies(a, w.clone().requires_grad_()));  // autograd records: the plain operators
    torch::NoGradGuard no_grad;
    ASSERT_TRUE(bmm_gelu_applies(a, w));
    const auto y = bmm_gelu(a, w);
    const auto ref = at::gelu(at::bmm(a.to(torch::kDouble), w.to(torch::kDouble)));
    EXPECT_LT((y.to(torch::kDouble) - ref).abs().max().item<double>() / ref.abs().max().item<double>(), 2e-6);
    EXPECT_LT(y.min().item<float>(), -0.1f);  // GELU's negative side exercised
    // A transposed view of w (K contiguous) reads in place: the same values.
    const auto wt = w.transpose(1, 2).contiguous().transpose(1, 2);
    EXPECT_TRUE(torch::equal(bmm_gelu(a, wt), y));
  }
}

// GELU value by value (through an identity w, so each output is GELU of one input): the
// rational erf of kernels/avx512_math.h against float64 erf over [-12, 12], the tails and zero
// included. Error below 4e-7 max(1, |x|) (the fit's float32 error is 3.2e-7), relative below
// 1e-6 for x >= 1e-3, where GELU(x) ~ x. On the negative tail, where GELU(x) -> 0, the bound is
// absolute: 1 + erf cancels there (GELU(-12) comes out near -7e-7 instead of -0).
TEST(GemmF32, GeluMatchesFloat64Erf) {
  if (!kernels::cpu::gemm_f32_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  MatmulMode m(CpuMatmul::kOwn);
  OwnEverywhere own;
  const int64_t n = 64;
  const auto x = torch::linspace(-12, 12, 256 * n).reshape({1, -1, n});  // (1, 256, 64): steps of 1.5e-3
  const auto y = gelu_bmm_fused(x, torch::eye(n).unsqueeze(0));
  const auto xd = x.to(torch::kDouble), ref = at::gelu(xd);
  const auto err = (y.to(torch::kDouble) - ref).abs();
  EXPECT_LT((err / xd.abs().clamp_min(1.0)).max().item<double>(), 4e-7);
  const auto pos = xd > 1e-3;
  EXPECT_LT((err.masked_select(pos) / ref.masked_select(pos)).max().item<double>(), 1e-6);
  EXPECT_LT(y.masked_select(x < -6).abs().max().item<float>(), 1e-6);
}

// The patch embedding trains on the CPU as a product over the patches and samples through the
// convolution: both against the float64 convolution, the weight's and bias's gradients too, in
// every matmul mode (Nano's 2x2 patches of 4 channels, and the emoji model's 4x4 of 3).
TEST(PatchEmbed, TrainingProductEqualsConvolution) {
  for (const auto mode : fast_modes()) {
    MatmulMode m(mode);
    for (const auto& [C, D, p] : {std::tuple<int64_t, int64_t, int64_t>{4, 256, 2}, {3, 128, 4}}) {
      SCOPED_TRACE(std::to_string(C) + " channels, patch " + std::to_string(p));
      torch::manual_seed(5);
      PatchEmbed pe(C, D, p);
      const auto x = torch::randn({3, C, 8 * p, 6 * p}), r = torch::randn({3, 48, D});
      auto y = pe->forward(x);
      ASSERT_EQ(y.sizes(), (std::vector<int64_t>{3, 48, D}));
      (y * r).sum().backward();
      auto w = pe->proj->weight.detach().to(torch::kDouble).requires_grad_(),
           b = pe->proj->bias.detach().to(torch::kDouble).requires_grad_();
      auto yd = at::conv2d(x.to(torch::kDouble), w, b, {p, p}).flatten(2).transpose(1, 2);
      (yd * r.to(torch::kDouble)).sum().backward();
      auto rel = [](const torch::Tensor& a, const torch::Tensor& ref) {
        return (a.to(torch::kDouble) - ref).abs().max().item<double>() / ref.abs().max().item<double>();
      };
      EXPECT_LT(rel(y.detach(), yd.detach()), 1e-6);
      EXPECT_LT(rel(pe->proj->weight.grad(), w.grad()), 1e-6);
      EXPECT_LT(rel(pe->proj->bias.grad(), b.grad()), 1e-6);
      torch::NoGradGuard no_grad;
      EXPECT_LT(rel(pe->forward(x), yd.detach()), 1e-6);
    }
  }
}
