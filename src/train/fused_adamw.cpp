#include "train/fused_adamw.h"

#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/scalar_tensor.h>

#include "core/error.h"

#include <map>

namespace microdit {

namespace {

torch::optim::AdamWParamState& state_of(torch::optim::AdamW& opt, const at::Tensor& p) {
  auto& slot = opt.state()[p.unsafeGetTensorImpl()];
  if (!slot) {  // first step: zero moments, as torch::optim::AdamW creates them
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(0);
    s->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
    s->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
    slot = std::move(s);
  }
  return static_cast<torch::optim::AdamWParamState&>(*slot);
}

}  // namespace

void set_adamw_step_counts(torch::optim::AdamW& opt, int64_t step) {
  for (auto& group : opt.param_groups())
    for (auto& p : group.params()) state_of(opt, p).step(step);
}

void fused_adamw_step(torch::optim::AdamW& opt, AdamWDeviceScalars* dev) {
  torch::NoGradGuard no_grad;
  if (dev) {
    MD_CHECK(dev->step.defined() && dev->lr.defined() && dev->step.numel() == 1 && dev->lr.numel() == 1,
             "fused AdamW: the device step and learning rate must be one-element tensors");
    dev->step.add_(1);
  }
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    MD_CHECK(!o.amsgrad(), "fused AdamW: amsgrad is not supported");
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    std::map<int64_t, at::Tensor> step_tensor;  // one per distinct step count (usually one)
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto* s = &state_of(opt, p);
      s->step(s->step() + 1);
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(s->exp_avg());
      exp_avg_sqs.push_back(s->exp_avg_sq());
      // The kernel reads the step count (already incremented) from a float tensor per param.
      if (dev) {
        steps.push_back(dev->step);
        continue;
      }
      auto& t = step_tensor[s->step()];
      if (!t.defined()) t = at::scalar_tensor(static_cast<double>(s->step()), p.options());
      steps.push_back(t);
    }
    if (params.empty()) continue;
    const auto [beta1, beta2] = o.betas();
    if (dev)
      at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, dev->lr, beta1, beta2,
                        o.weight_decay(), o.eps(), /*amsgrad=*/false, /*maximize=*/false);
    else
      at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, o.lr(), beta1, beta2,
                        o.weight_decay(), o.eps(), /*amsgrad=*/false, /*maximize=*/false);
  }
}

}  // namespace microdit
