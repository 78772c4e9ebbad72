#include "train/grad_clip.h"

#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/stack.h>

namespace microdit {

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return {};
  const auto norms = at::_foreach_norm(grads, 2);              // one per gradient
  auto total = at::stack(norms).norm(2);                       // ()
  const auto coef = at::clamp_max(max_norm / (total + 1e-6), 1.0);  // () on the device
  at::_foreach_mul_(grads, coef);
  return total;
}

}  // namespace microdit
