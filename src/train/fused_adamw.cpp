#include "train/fused_adamw.h"

#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/scalar_tensor.h>

#include "core/error.h"

#include <map>

namespace microdit {

void fused_adamw_step(torch::optim::AdamW& opt) {
  torch::NoGradGuard no_grad;
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    MD_CHECK(!o.amsgrad(), "fused AdamW: amsgrad is not supported");
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    std::map<int64_t, at::Tensor> step_tensor;  // one per distinct step count (usually one)
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto& slot = opt.state()[p.unsafeGetTensorImpl()];
      if (!slot) {  // first step: zero moments, as torch::optim::AdamW creates them
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->step(0);
        s->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
        s->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
        slot = std::move(s);
      }
      auto* s = static_cast<torch::optim::AdamWParamState*>(slot.get());
      s->step(s->step() + 1);
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(s->exp_avg());
      exp_avg_sqs.push_back(s->exp_avg_sq());
      // The kernel reads the step count (already incremented) from a float tensor per param.
      auto& t = step_tensor[s->step()];
      if (!t.defined()) t = at::scalar_tensor(static_cast<double>(s->step()), p.options());
      steps.push_back(t);
    }
    if (params.empty()) continue;
    const auto [beta1, beta2] = o.betas();
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, o.lr(), beta1, beta2,
                      o.weight_decay(), o.eps(), /*amsgrad=*/false, /*maximize=*/false);
  }
}

}  // namespace microdit
