#include "train/fused_adamw.h"

#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/record_function.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/error.h"
#include "kernels/adamw.h"
#include "train/bf16_weights.h"

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

// The parameters microdit's kernel updates (those with bf16 copies, and on the CPU all), grouped
// by gradient dtype and step count: one call of the kernel per group.
struct MixedGroups {
  std::map<std::pair<int, int64_t>, std::vector<kernels::AdamWSlot>> slots;
  std::vector<at::Tensor> keep;  // the gradients, alive until the kernels are queued
};

void run_mixed(MixedGroups& groups, const torch::optim::AdamWOptions& o, AdamWDeviceScalars* dev,
               const at::Tensor& grad_coef, const at::Tensor& like, double ema_step) {
  if (groups.slots.empty()) return;
  RECORD_FUNCTION("microdit::adamw_step", std::vector<c10::IValue>());
  MD_CHECK(!grad_coef.defined() || (grad_coef.scalar_type() == at::kFloat && grad_coef.numel() == 1 &&
                                    grad_coef.device() == like.device()),
           "fused AdamW: the gradient scale must be one float32 value on the weights' device");
  const auto [beta1, beta2] = o.betas();
  for (auto& [key, slots] : groups.slots) {
    kernels::AdamWHyper h;
    h.lr = o.lr();
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.eps = o.eps();
    h.weight_decay = o.weight_decay();
    h.step = static_cast<double>(key.second);
    if (dev) {
      h.lr_dev = dev->lr.data_ptr<float>();
      h.step_dev = dev->step.data_ptr<float>();
    }
    if (grad_coef.defined()) h.grad_coef = grad_coef.data_ptr<float>();
    h.ema_weight = ema_step;
    const auto gt = static_cast<kernels::DType>(key.first);
    if (like.is_cuda()) {
      const c10::cuda::CUDAGuard guard(like.device());
      kernels::adamw_step(slots.data(), static_cast<int64_t>(slots.size()), gt, kernels::DType::bf16, h,
                          c10::cuda::getCurrentCUDAStream(like.device().index()).stream());
    } else {
      kernels::cpu::adamw_step(slots.data(), static_cast<int64_t>(slots.size()), gt, kernels::DType::bf16, h);
    }
  }
}

}  // namespace

void set_adamw_step_counts(torch::optim::AdamW& opt, int64_t step) {
  for (auto& group : opt.param_groups())
    for (auto& p : group.params()) state_of(opt, p).step(step);
}

void fused_adamw_step(torch::optim::AdamW& opt, AdamWDeviceScalars* dev, Bf16Weights* copies,
                      const at::Tensor& grad_coef, const FusedEma* ema) {
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
    MixedGroups mixed;
    at::Tensor mixed_like;
    for (auto& p : group.params()) {
      MD_CHECK(!ema || p.device().is_cpu(), "fused AdamW: the EMA moves in the AdamW pass on the CPU only");
      const at::Tensor* copy = copies ? copies->copy_of(p) : nullptr;
      if (copy || p.device().is_cpu()) {  // microdit's kernel
        const at::Tensor g = copy && copy->grad().defined() ? copy->grad() : p.grad();
        if (!g.defined()) continue;
        MD_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && g.is_contiguous() &&
                     (g.scalar_type() == at::kBFloat16 || g.scalar_type() == at::kFloat) &&
                     g.device() == p.device() && g.numel() == p.numel(),
                 "fused AdamW: microdit's kernel needs a contiguous float32 weight and a contiguous bf16 or "
                 "float32 gradient of its size on its device");
        auto* s = &state_of(opt, p);
        // The kernel takes all of them as flat arrays of p's size.
        MD_CHECK(s->exp_avg().is_contiguous() && s->exp_avg_sq().is_contiguous() &&
                     s->exp_avg().scalar_type() == at::kFloat && s->exp_avg_sq().scalar_type() == at::kFloat &&
                     s->exp_avg().numel() == p.numel() && s->exp_avg_sq().numel() == p.numel() &&
                     (!copy || (copy->is_contiguous() && copy->numel() == p.numel())),
                 "fused AdamW: microdit's kernel needs contiguous float32 moments (and a contiguous copy) of the "
                 "weight's size");
        float* shadow = nullptr;
        if (ema) {
          const auto it = ema->shadow.find(p.unsafeGetTensorImpl());
          MD_CHECK(it != ema->shadow.end(), "fused AdamW: a weight has no EMA tensor");
          const at::Tensor& e = it->second;
          MD_CHECK(e.scalar_type() == at::kFloat && e.is_contiguous() && e.numel() == p.numel() && e.device() == p.device(),
                   "fused AdamW: an EMA tensor must be contiguous float32 of its weight's size on its device");
          shadow = e.data_ptr<float>();
        }
        s->step(s->step() + 1);
        const int gt = static_cast<int>(g.scalar_type() == at::kBFloat16 ? kernels::DType::bf16 : kernels::DType::f32);
        mixed.slots[{gt, s->step()}].push_back({p.data_ptr<float>(), g.data_ptr(), s->exp_avg().data_ptr<float>(),
                                                s->exp_avg_sq().data_ptr<float>(), copy ? copy->data_ptr() : nullptr,
                                                p.numel(), shadow});
        mixed.keep.push_back(g);
        mixed_like = p;
        continue;
      }
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
    {
      torch::NoGradGuard ng;
      run_mixed(mixed, o, dev, grad_coef, mixed_like, ema ? ema->weight_step : 1.0);
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
  if (copies) copies->mark_fresh();
}

}  // namespace microdit
