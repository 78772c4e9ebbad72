// Helpers shared by the CPU attention kernels' tests (test_attention_bf16.cpp, test_attention_f32.cpp).
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "model/attention.h"
#include "test_util.h"

namespace microdit::attention_test {

// A (B, H, seq, hd) view of a (B, seq, H, hd) tensor of dtype dt, as the model's heads are.
inline torch::Tensor heads(int64_t B, int64_t seq, int64_t H, int64_t hd, torch::Dtype dt) {
  return torch::randn({B, seq, H, hd}).to(dt).transpose(1, 2);
}

// Norm-wise relative difference of a to the reference.
inline double rel(const torch::Tensor& a, const torch::Tensor& ref) {
  return ((a.to(torch::kDouble) - ref.to(torch::kDouble)).norm() / ref.to(torch::kDouble).norm()).item<double>();
}

// --cpu-attention for one scope.
struct Mode : test_util::ScopedSetting<CpuAttention> {
  explicit Mode(CpuAttention m) : ScopedSetting(cpu_attention, set_cpu_attention, m) {}
};

// The message of any exception f throws (the kernels throw std::runtime_error), or "".
inline std::string what_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// f throws one line that starts with the kernel's name (`prefix`) and names the problem (`what`).
inline void expect_one_line_error(const std::function<void()>& f, const std::string& prefix, const std::string& what) {
  const auto e = what_of(f);
  EXPECT_NE(e.find(prefix), std::string::npos) << e;
  EXPECT_NE(e.find(what), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << e;
}

// Attention written out in float64 on the same values: the output, the log-sum-exp of each row
// of scale q k^T, and the gradients of q, k, v for the output gradient g.
struct Float64Attention {
  torch::Tensor o, lse, dq, dk, dv;
};
inline Float64Attention attention_in_float64(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             const torch::Tensor& g, double scale) {
  auto qd = q.to(torch::kDouble).requires_grad_(), kd = k.to(torch::kDouble).requires_grad_(),
       vd = v.to(torch::kDouble).requires_grad_();
  const auto logits = torch::matmul(qd, kd.transpose(-1, -2)) * scale;
  const auto od = torch::matmul(torch::softmax(logits, -1), vd);
  const auto grads = torch::autograd::grad({od}, {qd, kd, vd}, {g.to(torch::kDouble)});
  return {od.detach(), torch::logsumexp(logits.detach(), -1), grads[0], grads[1], grads[2]};
}

// One shape through a pair of kernel entry points (kernels/attention_cpu.h) against attention in
// float64 on the same values: the shapes and dtype of every result; lse within bounds.lse
// (absolute); o, dq, dk, dv within bounds.values (norm-wise); the same output bits without the
// lse (a pass without gradients); and ATen's flash forward pass on the same inputs giving the
// same lse within bounds.aten_lse (the backward pass takes either), and where bounds.aten_values
// is set, an output within it of float64's.
struct AttentionShape {
  int64_t B, H, N, L, hd;
};
struct Float64Bounds {
  double lse, values, aten_lse, aten_values = 0;
};
using ForwardKernel = std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, double, bool)>;
using BackwardKernel = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double)>;
inline void expect_passes_near_float64(const AttentionShape& s, torch::Dtype dt, const ForwardKernel& forward,
                                       const BackwardKernel& backward, const Float64Bounds& bounds) {
  SCOPED_TRACE("B " + std::to_string(s.B) + " H " + std::to_string(s.H) + " N " + std::to_string(s.N) + " L " +
               std::to_string(s.L) + " hd " + std::to_string(s.hd));
  const auto q = heads(s.B, s.N, s.H, s.hd, dt), k = heads(s.B, s.L, s.H, s.hd, dt), v = heads(s.B, s.L, s.H, s.hd, dt);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.hd));
  const auto [o, lse] = forward(q, k, v, scale, /*with_lse=*/true);
  ASSERT_EQ(o.sizes(), q.sizes());
  EXPECT_EQ(o.scalar_type(), dt);
  ASSERT_EQ(lse.sizes(), (std::vector<int64_t>{s.B, s.H, s.N}));
  // Without gradients there is no lse to keep: the same output bits without it.
  const auto [o_only, no_lse] = forward(q, k, v, scale, /*with_lse=*/false);
  EXPECT_FALSE(no_lse.defined());
  EXPECT_TRUE(torch::equal(o_only, o));
  const auto g = heads(s.B, s.N, s.H, s.hd, dt);
  const auto [dq, dk, dv] = backward(q, k, v, o, lse, g, scale);
  ASSERT_EQ(dq.sizes(), q.sizes());
  ASSERT_EQ(dk.sizes(), k.sizes());
  ASSERT_EQ(dv.sizes(), v.sizes());
  EXPECT_EQ(dq.scalar_type(), dt);
  const auto ref = attention_in_float64(q, k, v, g, scale);
  EXPECT_LT((lse.to(torch::kDouble) - ref.lse).abs().max().item<double>(), bounds.lse);
  EXPECT_LT(rel(o, ref.o), bounds.values);
  EXPECT_LT(rel(dq, ref.dq), bounds.values);
  EXPECT_LT(rel(dk, ref.dk), bounds.values);
  EXPECT_LT(rel(dv, ref.dv), bounds.values);
  const auto [o_aten, lse_aten] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v);
  EXPECT_LT((lse_aten - lse).abs().max().item<double>(), bounds.aten_lse);
  if (bounds.aten_values > 0) {
    EXPECT_LT(rel(o_aten, ref.o), bounds.aten_values);
  }
}

}  // namespace microdit::attention_test
