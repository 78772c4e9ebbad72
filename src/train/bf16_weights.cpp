#include "train/bf16_weights.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include "core/choice.h"
#include "core/error.h"
#include "kernels/fused.h"
#include "model/ffn.h"

namespace microdit {

Bf16WeightsMode parse_bf16_weights(const std::string& option, const std::string& name) {
  return parse_choice<Bf16WeightsMode>(
      option, name, {{"auto", Bf16WeightsMode::automatic}, {"on", Bf16WeightsMode::on}, {"off", Bf16WeightsMode::off}});
}

bool use_bf16_weights(Bf16WeightsMode mode, c10::Device device, bool bf16, bool fused_adamw, bool sharded,
                      const std::string& option) {
  if (mode == Bf16WeightsMode::off) return false;
  const char* missing = !bf16                                      ? "bf16 autocast"
                        : sharded                                  ? "an unsharded optimizer (not train.shard_optimizer)"
                        : !fused_adamw                             ? "the fused AdamW step"
                        : device.is_cuda() && !kernels::available() ? "the fused CUDA kernels (built with nvcc)"
                                                                    : nullptr;
  if (mode == Bf16WeightsMode::on) {
    MD_CHECK(!missing, "{} on needs {}", option, missing);
    return true;
  }
  return !missing && device.is_cuda();
}

Bf16Weights::Bf16Weights(torch::nn::Module& model) {
  std::vector<at::Tensor*> members;
  for (auto& m : model.modules(/*include_self=*/true)) {
    if (auto* lin = m->as<torch::nn::LinearImpl>()) {
      members.push_back(&lin->weight);
      members.push_back(&lin->bias);
    } else if (auto* conv = m->as<torch::nn::Conv2dImpl>()) {
      members.push_back(&conv->weight);
      members.push_back(&conv->bias);
    } else if (auto* moe = m->as<FeedForwardECMoEImpl>()) {
      members.push_back(&moe->w1);
      members.push_back(&moe->w2);
    }
  }
  for (at::Tensor* t : members) {
    if (!t->defined() || t->scalar_type() != at::kFloat || !t->requires_grad()) continue;
    if (index_.count(t->unsafeGetTensorImpl())) continue;  // a module reached twice
    Entry e{t, *t, t->detach().to(at::kBFloat16).requires_grad_(true)};
    index_.emplace(t->unsafeGetTensorImpl(), entries_.size());
    entries_.push_back(std::move(e));
  }
  fresh_ = true;  // the copies were just made
}

namespace {

// On a copy: its accumulated bf16 gradient into the float32 weight's .grad, then the weight's
// own post-accumulate hook (if any).
struct SumIntoWeight : torch::autograd::PostAccumulateGradHook {
  explicit SumIntoWeight(at::Tensor w) : weight(std::move(w)) {}
  void operator()(const torch::autograd::Variable& copy) override {
    at::NoGradGuard no_grad;
    at::Tensor& g = copy.mutable_grad();  // bf16
    if (!g.defined()) return;
    at::Tensor& wg = weight.mutable_grad();
    if (wg.defined()) wg.add_(g);  // float32 += bf16, in float32: the plain path's accumulation
    else wg = g.to(at::kFloat);
    g.reset();  // freed now: the float32 sum holds it
    if (auto& hook = torch::autograd::impl::post_acc_grad_hooks(weight)) (*hook)(weight);
  }
  at::Tensor weight;
};

}  // namespace

void Bf16Weights::sum_gradients_in_float32() {
  if (float32_sums_) return;
  for (auto& e : entries_)
    torch::autograd::impl::set_post_acc_grad_hooks(e.copy, std::make_unique<SumIntoWeight>(e.weight));
  float32_sums_ = true;
}

int64_t Bf16Weights::numel() const {
  int64_t n = 0;
  for (const auto& e : entries_) n += e.weight.numel();
  return n;
}

void Bf16Weights::refresh() {
  torch::NoGradGuard no_grad;
  for (auto& e : entries_) e.copy.copy_(e.weight);
  fresh_ = true;
}

Bf16Weights::Bound::Bound(Bf16Weights& w) : w_(w) {
  MD_CHECK(!w_.bound_, "bf16 weight copies: already bound to the modules");
  if (!w_.fresh_) w_.refresh();
  for (auto& e : w_.entries_) {
    e.copy.mutable_grad().reset();
    *e.member = e.copy;
  }
  w_.bound_ = true;
}

Bf16Weights::Bound::~Bound() {
  for (auto& e : w_.entries_) *e.member = e.weight;
  w_.bound_ = false;
}

std::vector<at::Tensor> Bf16Weights::grad_targets(const std::vector<at::Tensor>& params) const {
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) {
    const at::Tensor* c = copy_of(p);
    out.push_back(c ? *c : p);
  }
  return out;
}

const at::Tensor* Bf16Weights::copy_of(const at::Tensor& weight) const {
  auto it = index_.find(weight.unsafeGetTensorImpl());
  return it == index_.end() ? nullptr : &entries_[it->second].copy;
}

}  // namespace microdit
