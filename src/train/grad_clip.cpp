#include "train/grad_clip.h"

#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>

#include <ATen/Parallel.h>

#include <algorithm>

#include "core/cpu_workers.h"
#include "train/bf16_weights.h"

namespace microdit {

namespace {

// The float32 norm of each gradient, as _foreach_norm(g, 2, float32) gives it. CPU gradients on
// the process's CPU workers, a gradient per task, so that the step's serial part (the workers
// idle) holds no pass over all gradients; elsewhere, one _foreach_norm.
std::vector<at::Tensor> gradient_norms(const std::vector<at::Tensor>& grads) {
  const bool cpu = std::all_of(grads.begin(), grads.end(), [](const at::Tensor& g) { return g.device().is_cpu(); });
  if (!cpu || at::get_num_threads() <= 1) return at::_foreach_norm(grads, 2, at::kFloat);
  std::vector<at::Tensor> out(grads.size());
  run_cpu_workers(at::get_num_threads(), static_cast<int64_t>(grads.size()), [&](int64_t i) {
    const auto k = static_cast<size_t>(i);
    out[k] = at::linalg_vector_norm(grads[k], 2, std::nullopt, false, at::kFloat);
  });
  return out;
}

// The global norm of `scaled` and `deferred` together (deferred's bf16 gradients in float32),
// `scaled` multiplied in place by min(1, max_norm / (norm + 1e-6)), that scale in *coef.
// deferred_at[i] says whether the i-th gradient of the parameters' order is the next of
// `deferred` or of `scaled` (null: all of `scaled`, then all of `deferred`): the norms are
// summed in the parameters' order, so that the total, and with it every clipped step, does not
// depend on which weights have bf16 copies.
at::Tensor clip(const std::vector<at::Tensor>& scaled, const std::vector<at::Tensor>& deferred, double max_norm,
                at::Tensor* coef, const std::vector<bool>* deferred_at = nullptr) {
  if (scaled.empty() && deferred.empty()) return {};
  std::vector<at::Tensor> ns, nd;  // float32, one per gradient
  if (!scaled.empty()) ns = at::_foreach_norm(scaled, 2);
  if (!deferred.empty()) nd = gradient_norms(deferred);
  std::vector<at::Tensor> norms;
  if (deferred_at) {
    size_t i = 0, j = 0;
    for (const bool d : *deferred_at) norms.push_back(d ? nd.at(j++) : ns.at(i++));
  } else {
    norms = ns;
    norms.insert(norms.end(), nd.begin(), nd.end());
  }
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

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, const Bf16Weights* copies,
                          at::Tensor* coef) {
  std::vector<at::Tensor> scaled, deferred;
  std::vector<bool> deferred_at;
  for (const auto& p : params) {
    // A weight with a copy: its gradient (bf16 on the copy, or float32 on the weight when summed
    // there) is scaled by the AdamW kernel, which applies *coef to every such weight, as it does
    // to every weight on the CPU.
    const at::Tensor* c = copies ? copies->copy_of(p) : nullptr;
    if (c && (c->grad().defined() || p.grad().defined())) {
      deferred.push_back(c->grad().defined() ? c->grad() : p.grad());
      deferred_at.push_back(true);
    } else if (p.grad().defined() && p.device().is_cpu()) {
      deferred.push_back(p.grad());
      deferred_at.push_back(true);
    } else if (p.grad().defined()) {
      scaled.push_back(p.grad());
      deferred_at.push_back(false);
    }
  }
  return clip(scaled, deferred, max_norm, coef, &deferred_at);
}

}  // namespace microdit
