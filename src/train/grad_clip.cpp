#include "train/grad_clip.h"

#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/stack.h>

#include "train/bf16_weights.h"

namespace microdit {

namespace {

// The global norm of `scaled` and `deferred` together (deferred's bf16 gradients in float32),
// `scaled` multiplied in place by min(1, max_norm / (norm + 1e-6)), that scale in *coef.
at::Tensor clip(const std::vector<at::Tensor>& scaled, const std::vector<at::Tensor>& deferred, double max_norm,
                at::Tensor* coef) {
  if (scaled.empty() && deferred.empty()) return {};
  std::vector<at::Tensor> norms;  // float32, one per gradient
  if (!scaled.empty()) norms = at::_foreach_norm(scaled, 2);
  if (!deferred.empty())
    for (auto& n : at::_foreach_norm(deferred, 2, at::kFloat)) norms.push_back(n);
  auto total = at::stack(norms).norm(2);                         // ()
  const auto c = at::clamp_max(max_norm / (total + 1e-6), 1.0);  // () on the device
  if (!scaled.empty()) at::_foreach_mul_(scaled, c);
  if (coef) *coef = c;
  return total;
}

}  // namespace

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  return clip(grads, {}, max_norm, nullptr);
}

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, const Bf16Weights& copies,
                          at::Tensor* coef) {
  std::vector<at::Tensor> scaled, deferred;
  for (const auto& p : params) {
    // A weight with a copy: its gradient (bf16 on the copy, or float32 on the weight when summed
    // there) is scaled by the AdamW kernel, which applies *coef to every such weight.
    const at::Tensor* c = copies.copy_of(p);
    if (c && c->grad().defined()) deferred.push_back(c->grad());
    else if (c && p.grad().defined()) deferred.push_back(p.grad());
    else if (p.grad().defined()) scaled.push_back(p.grad());
  }
  return clip(scaled, deferred, max_norm, coef);
}

}  // namespace microdit
