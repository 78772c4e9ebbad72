// Helpers shared by the CPU attention kernels' tests (test_attention_amx.cpp, test_attention_f32.cpp).
#pragma once
#include <torch/torch.h>

#include <functional>
#include <string>

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

}  // namespace microdit::attention_test
