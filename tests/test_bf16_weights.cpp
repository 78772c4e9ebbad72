// bf16 weight copies kept by the AdamW step (train/bf16_weights.h, kernels/adamw.h) against
// the plain path (autocast casting the float32 weights every step, ATen's fused AdamW): the
// same losses and, up to the optimizers' float rounding, the same weights; the CPU always,
// CUDA where a GPU is there.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>

#include "core/autocast.h"
#include "diffusion/edm.h"
#include "kernels/adamw.h"
#include "kernels/fused.h"
#include "model/ffn.h"
#include "model/microdit.h"
#include "test_util.h"
#include "train/bf16_weights.h"
#include "train/fused_adamw.h"
#include "train/grad_clip.h"
#include "train/parallel_backward.h"

using namespace microdit;
using namespace microdit::test_util;

namespace {

struct Run {
  std::vector<double> losses;
  std::vector<torch::Tensor> grads;   // the first step's gradients in float32, on the CPU
  std::vector<torch::Tensor> params;  // float32 weights after the steps, on the CPU
  std::vector<torch::Tensor> copies;  // the bf16 copies (empty on the plain path)
};

// `steps` bf16 AdamW steps of the tiny MicroDiT on fixed data, with or without the copies.
// The optimizer of the copies' path on the plain path's float32 gradients: the mixed-precision
// kernel for the weights that `which` has copies of (writing no copies), ATen's for the rest.
void kernel_adamw(torch::optim::AdamW& opt, const c10::Device& device, const Bf16Weights& which) {
  torch::NoGradGuard ng;
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    std::vector<kernels::AdamWSlot> slots;
    std::vector<torch::Tensor> done;
    int64_t step = 0;
    for (auto& p : group.params()) {
      if (!p.grad().defined() || !which.copy_of(p)) continue;
      done.push_back(p);
      auto& s = static_cast<torch::optim::AdamWParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
      s.step(s.step() + 1);
      step = s.step();
      slots.push_back({p.data_ptr<float>(), p.grad().data_ptr(), s.exp_avg().data_ptr<float>(),
                       s.exp_avg_sq().data_ptr<float>(), nullptr, p.numel()});
    }
    kernels::AdamWHyper h;
    h.lr = o.lr();
    std::tie(h.beta1, h.beta2) = o.betas();
    h.eps = o.eps();
    h.weight_decay = o.weight_decay();
    h.step = static_cast<double>(step);
    if (device.is_cuda())
      kernels::adamw_step(slots.data(), static_cast<int64_t>(slots.size()), kernels::DType::f32,
                          kernels::DType::bf16, h, nullptr);
    else
      kernels::cpu::adamw_step(slots.data(), static_cast<int64_t>(slots.size()), kernels::DType::f32,
                               kernels::DType::bf16, h);
    for (auto& p : done) p.mutable_grad().reset();  // fused_adamw_step below leaves them alone
  }
  fused_adamw_step(opt);
}

enum class Optimizer { aten, torch, kernel };

// accum: backward passes per step (gradient accumulation over equal row slices); with copies,
// their gradients are then summed in float32 on the weights.
Run train(const c10::Device& device, bool copies_on, int steps, int workers = 1, double clip = 0,
          Optimizer optimizer = Optimizer::aten, int accum = 1) {
  torch::manual_seed(0);
  const auto c = tiny_config();
  MicroDiT model(c);
  small_random_weights(*model);
  model->to(device);
  torch::optim::AdamW opt(model->parameters(),
                          torch::optim::AdamWOptions(3e-3).betas({0.9, 0.99}).eps(1e-8).weight_decay(0.1));
  const int64_t B = 4;
  auto cpu = torch::TensorOptions();
  auto x = torch::randn({B, c.in_channels, c.input_size, c.input_size}, cpu).to(device);
  auto y = torch::randn({B, 1, 5, c.caption_channels}, cpu).to(device);
  std::unique_ptr<Bf16Weights> copies;
  if (copies_on) copies = std::make_unique<Bf16Weights>(*model);
  if (copies && accum > 1) copies->sum_gradients_in_float32();
  const auto params = model->parameters();
  const auto targets = copies ? copies->grad_targets(params) : params;
  std::unique_ptr<Bf16Weights> which;  // Optimizer::kernel: the weights the copies' path has copies of
  if (optimizer == Optimizer::kernel) {
    set_adamw_step_counts(opt, 0);  // zero moments
    which = std::make_unique<Bf16Weights>(*model);
  }
  EDMConfig edm;
  Run r;
  for (int i = 0; i < steps; ++i) {
    torch::manual_seed(100 + i);
    auto rnd = torch::randn({B, 1, 1, 1}).to(device), noise = torch::randn(x.sizes()).to(device);
    auto mask_noise = torch::rand({B, c.num_tokens()}).to(device);
    opt.zero_grad();
    std::optional<Bf16Weights::Bound> bound;
    if (copies) bound.emplace(*copies);
    double loss = 0;
    const int64_t micro = B / accum;
    for (int m = 0; m < accum; ++m)
      loss += parallel_backward(targets, micro, workers, 1.0 / accum, [&](int64_t s, int64_t n) {
        s += m * micro;
        LossDraws d;
        d.rnd_normal = rnd.narrow(0, s, n);
        d.noise = noise.narrow(0, s, n);
        d.mask = mask_from_noise(mask_noise.narrow(0, s, n), c.kept_tokens(0.5));
        AutocastGuard autocast(device.type(), true);
        return edm_loss(*model, x.narrow(0, s, n), y.narrow(0, s, n), d, edm);
      }, copies ? &params : nullptr).item<double>() / accum;
    bound.reset();
    r.losses.push_back(loss);
    if (i == 0)
      for (size_t k = 0; k < params.size(); ++k) {
        const auto* cp = copies ? copies->copy_of(params[k]) : nullptr;
        const auto g = cp && cp->grad().defined() ? cp->grad() : params[k].grad();
        r.grads.push_back(g.defined() ? g.to(at::kFloat).cpu() : torch::zeros_like(params[k]).cpu());
      }
    torch::Tensor coef;
    if (clip > 0) {
      if (copies) clip_grad_norm(params, clip, copies.get(), &coef);
      else clip_grad_norm(params, clip);
    }
    if (optimizer == Optimizer::torch) opt.step();
    else if (optimizer == Optimizer::kernel && !copies) kernel_adamw(opt, device, *which);
    else fused_adamw_step(opt, nullptr, copies.get(), coef);
  }
  for (const auto& p : params) {
    r.params.push_back(p.detach().cpu().clone());
    if (copies) {
      const auto* cp = copies->copy_of(p);
      if (cp) r.copies.push_back(cp->detach().cpu().clone());
    }
  }
  return r;
}

double worst_param_difference(const Run& a, const Run& b) { return worst_relative_difference(a.params, b.params); }

bool cuda_usable(const c10::Device& d) { return !d.is_cuda() || kernels::available(); }

}  // namespace

TEST(Bf16Weights, CollectsTheMatmulWeightsAndRestoresTheModules) {
  torch::manual_seed(0);
  MicroDiT model(tiny_config());
  Bf16Weights copies(*model);
  // Every Linear and Conv2d weight and bias and every expert weight, nothing else (norms, ...).
  size_t expected = 0;
  for (auto& m : model->modules()) {
    if (auto* l = m->as<torch::nn::LinearImpl>()) expected += 1 + (l->bias.defined() ? 1 : 0);
    if (auto* cv = m->as<torch::nn::Conv2dImpl>()) expected += 1 + (cv->bias.defined() ? 1 : 0);
    if (m->as<FeedForwardECMoEImpl>()) expected += 2;
  }
  EXPECT_EQ(copies.size(), expected);
  EXPECT_GT(copies.size(), 10u);
  int64_t all = 0;
  for (const auto& p : model->parameters()) all += p.numel();
  EXPECT_GT(copies.numel(), all * 9 / 10) << "most weights are matmul weights";
  for (const auto& p : model->parameters()) {
    const auto* c = copies.copy_of(p);
    if (!c) continue;
    EXPECT_EQ(c->scalar_type(), at::kBFloat16);
    EXPECT_TRUE(c->requires_grad());
    EXPECT_TRUE(torch::equal(*c, p.detach().to(at::kBFloat16)));
  }
  torch::Tensor w;
  for (auto& m : model->modules())
    if (auto* l = m->as<torch::nn::LinearImpl>()) {
      w = l->weight;
      {
        auto bound = copies.bind();
        EXPECT_EQ(l->weight.scalar_type(), at::kBFloat16) << "bound: the module multiplies the copy";
        EXPECT_THROW(copies.bind(), std::exception) << "bound twice";
      }
      EXPECT_EQ(l->weight.unsafeGetTensorImpl(), w.unsafeGetTensorImpl()) << "unbound: the float32 weight again";
      break;
    }
  ASSERT_TRUE(w.defined());
  // A stale copy is written again at the next bind.
  {
    torch::NoGradGuard ng;
    w.add_(1.0);
  }
  copies.invalidate();
  { auto bound = copies.bind(); }
  EXPECT_TRUE(torch::equal(*copies.copy_of(w), w.detach().to(at::kBFloat16)));
}

bool same_gradients(const Run& a, const Run& b) {
  if (a.grads.size() != b.grads.size()) return false;
  for (size_t i = 0; i < a.grads.size(); ++i)
    if (!torch::equal(a.grads[i], b.grads[i])) return false;
  return true;
}

TEST(Bf16Weights, TrainsAsThePlainBf16Path) {
  for (const auto& device : test_devices()) {
    if (!cuda_usable(device)) continue;
    SCOPED_TRACE(device.str());
    // One step: the forward pass multiplies the same bf16 values and the backward pass yields
    // the same gradients, to the bit; the AdamW kernels agree to float rounding.
    const auto plain1 = train(device, false, 1), mixed1 = train(device, true, 1);
    EXPECT_EQ(plain1.losses[0], mixed1.losses[0]);
    EXPECT_TRUE(same_gradients(plain1, mixed1));
    EXPECT_LT(worst_param_difference(plain1, mixed1), 1e-6);
    // More steps. With ATen's AdamW on the plain path, a weight one float32 ulp apart can round
    // to the neighbouring bf16 value, so the two drift apart a little (as two AdamW
    // implementations do under bf16); with the same AdamW arithmetic on both (the kernel on the
    // plain path's float32 gradients), they stay equal to the bit: same copies, same gradients.
    const auto plain = train(device, false, 4), mixed = train(device, true, 4);
    ASSERT_EQ(plain.losses.size(), mixed.losses.size());
    for (size_t i = 1; i < plain.losses.size(); ++i)
      EXPECT_NEAR(plain.losses[i], mixed.losses[i], 1e-3 * std::abs(plain.losses[i]));
    const auto same_math = train(device, false, 4, 1, 0, Optimizer::kernel);
    EXPECT_EQ(same_math.losses, mixed.losses);
    EXPECT_EQ(worst_param_difference(same_math, mixed), 0.0);
    // The steps move the weights (equal no-ops would pass the comparisons too).
    const auto none = train(device, false, 0);
    EXPECT_GT(worst_param_difference(none, plain1), 1e-3);
    EXPECT_GT(worst_param_difference(none, mixed), 1e-2);
    // Each copy is its weight rounded to bf16.
    size_t k = 0;
    for (size_t i = 0; i < mixed.params.size() && k < mixed.copies.size(); ++i)
      if (mixed.params[i].sizes() == mixed.copies[k].sizes() &&
          torch::equal(mixed.params[i].to(at::kBFloat16), mixed.copies[k]))
        ++k;
    EXPECT_EQ(k, mixed.copies.size());
  }
}

TEST(Bf16Weights, CpuWorkersAndClipping) {
  // Two row slices: their bf16 gradients are summed in float32 into the weights' .grad.
  const c10::Device cpu(c10::kCPU);
  const auto plain = train(cpu, false, 1, 2), mixed = train(cpu, true, 1, 2);
  EXPECT_EQ(plain.losses[0], mixed.losses[0]);
  EXPECT_TRUE(same_gradients(plain, mixed));
  EXPECT_LT(worst_param_difference(plain, mixed), 1e-6);
  // Clipping at a norm the gradients exceed: the scale reaches the copies' gradients in the kernel.
  for (const auto& device : test_devices()) {
    if (!cuda_usable(device)) continue;
    SCOPED_TRACE(device.str());
    const auto pc = train(device, false, 1, 1, 1e-3), mc = train(device, true, 1, 1, 1e-3);
    EXPECT_LT(worst_param_difference(pc, mc), 1e-6);
    // Adam's first step hardly depends on the gradient's scale: compare the second.
    const auto pc2 = train(device, false, 2, 1, 1e-3), mc2 = train(device, true, 2, 1, 1e-3);
    EXPECT_LT(worst_param_difference(pc2, mc2), 1e-2);
    EXPECT_GT(worst_param_difference(pc2, train(device, false, 2, 1, 0)), 1e-3) << "the clipping must bite";
  }
}

// Gradient accumulation (and, in the trainer, data parallelism): each copy's gradient is added
// to its weight's float32 .grad after each backward pass, so the sums are the plain path's to
// the bit, and with the same AdamW arithmetic whole runs are equal to the bit, clipped or not.
TEST(Bf16Weights, SumsInFloat32WithAccumulation) {
  for (const auto& device : test_devices()) {
    if (!cuda_usable(device)) continue;
    SCOPED_TRACE(device.str());
    const auto plain = train(device, false, 1, 1, 0, Optimizer::aten, 2);
    const auto mixed = train(device, true, 1, 1, 0, Optimizer::aten, 2);
    EXPECT_EQ(plain.losses[0], mixed.losses[0]);
    EXPECT_TRUE(same_gradients(plain, mixed)) << "float32 sums of the two passes";
    // Summing in bf16 instead (the copies' own accumulation) would round: a negative control.
    EXPECT_FALSE(same_gradients(plain, train(device, false, 1, 1, 0, Optimizer::aten, 1)));
    const auto same_math = train(device, false, 3, 1, 0, Optimizer::kernel, 2);
    const auto mixed3 = train(device, true, 3, 1, 0, Optimizer::aten, 2);
    EXPECT_EQ(same_math.losses, mixed3.losses);
    EXPECT_EQ(worst_param_difference(same_math, mixed3), 0.0);
    // Clipped: the float32 sums are scaled once, by the kernel (not also in place).
    const auto pc = train(device, false, 2, 1, 1e-3, Optimizer::kernel, 2);
    const auto mc = train(device, true, 2, 1, 1e-3, Optimizer::aten, 2);
    EXPECT_EQ(worst_param_difference(pc, mc), 0.0);
    EXPECT_GT(worst_param_difference(pc, train(device, false, 2, 1, 0, Optimizer::kernel, 2)), 1e-3)
        << "the clipping must bite";
  }
  // CPU workers also sum into the float32 weights: clipped, the same single scaling.
  const c10::Device cpu(c10::kCPU);
  const auto pw = train(cpu, false, 2, 2, 1e-3, Optimizer::kernel), mw = train(cpu, true, 2, 2, 1e-3);
  EXPECT_EQ(worst_param_difference(pw, mw), 0.0);
}

TEST(Bf16Weights, AdamWKernelMatchesATen) {
  // One tensor, bf16 gradients (the copies' own) or float32 ones (their sums with gradient
  // accumulation or data parallelism): the kernel against ATen's fused AdamW on their float32
  // values. Offset 1 puts every tensor one element past an aligned address: the CUDA kernel's
  // 4-wide loads must then fall back to its scalar loop (n is not a multiple of 4 either: the tail).
  for (const auto& device : test_devices())
  for (const auto gdt : {at::kBFloat16, at::kFloat})
  for (const int64_t offset : {0, 1}) {
    if (!cuda_usable(device)) continue;
    SCOPED_TRACE(device.str() + " offset " + std::to_string(offset) + " gradients " + c10::toString(gdt));
    const auto gt = gdt == at::kBFloat16 ? kernels::DType::bf16 : kernels::DType::f32;
    torch::manual_seed(1);
    auto opts = torch::TensorOptions().device(device);
    const int64_t n = 100003;  // not a multiple of any block
    auto at_offset = [&](const torch::Tensor& t) {  // the same values, `offset` elements into a buffer
      auto buffer = torch::zeros({n + offset}, t.options());
      buffer.narrow(0, offset, n).copy_(t);
      return buffer.narrow(0, offset, n);
    };
    auto p0 = torch::randn({n}, opts), m0 = torch::randn({n}, opts) * 0.1, v0 = torch::rand({n}, opts) * 0.01;
    auto g = at_offset(torch::randn({n}, opts).to(gdt));
    auto p = at_offset(p0), m = at_offset(m0), v = at_offset(v0);
    auto copy = at_offset(torch::empty({n}, opts.dtype(at::kBFloat16)));
    auto coef = torch::full({}, 0.5f, opts);
    kernels::AdamWSlot slot{p.data_ptr<float>(), g.data_ptr(), m.data_ptr<float>(), v.data_ptr<float>(),
                            copy.data_ptr(), n};
    kernels::AdamWHyper h;
    h.lr = 1e-3;
    h.beta1 = 0.9;
    h.beta2 = 0.95;
    h.eps = 1e-8;
    h.weight_decay = 0.1;
    h.step = 7;
    h.grad_coef = coef.data_ptr<float>();
    if (device.is_cuda()) {
      kernels::adamw_step(&slot, 1, gt, kernels::DType::bf16, h, nullptr);
      torch::cuda::synchronize();
    } else {
      kernels::cpu::adamw_step(&slot, 1, gt, kernels::DType::bf16, h);
    }
    auto rp = p0.clone(), rm = m0.clone(), rv = v0.clone();
    auto rg = g.to(at::kFloat) * coef;
    auto step = torch::full({}, 7.0f, opts);
    at::_fused_adamw_({rp}, {rg}, {rm}, {rv}, {}, {step}, 1e-3, 0.9, 0.95, 0.1, 1e-8, false, false);
    EXPECT_LT((p - rp).abs().max().item<double>(), 1e-6);
    EXPECT_LT((m - rm).abs().max().item<double>(), 1e-6);
    EXPECT_LT((v - rv).abs().max().item<double>(), 1e-7);
    EXPECT_GT((p - p0).abs().max().item<double>(), 1e-4) << "the step moves the weights";
    EXPECT_TRUE(torch::equal(copy, p.to(at::kBFloat16)));
  }
}

TEST(Bf16Weights, Settings) {
  const c10::Device cpu(c10::kCPU), gpu(c10::kCUDA, 0);
  EXPECT_FALSE(use_bf16_weights(Bf16WeightsMode::automatic, cpu, true, true, false, "--x"));
  EXPECT_TRUE(use_bf16_weights(Bf16WeightsMode::on, cpu, true, true, false, "--x"));
  EXPECT_FALSE(use_bf16_weights(Bf16WeightsMode::off, gpu, true, true, false, "--x"));
  EXPECT_EQ(use_bf16_weights(Bf16WeightsMode::automatic, gpu, true, true, false, "--x"), kernels::available());
  EXPECT_FALSE(use_bf16_weights(Bf16WeightsMode::automatic, gpu, false, true, false, "--x"));
  EXPECT_FALSE(use_bf16_weights(Bf16WeightsMode::automatic, gpu, true, true, true, "--x"));
  EXPECT_THROW(use_bf16_weights(Bf16WeightsMode::on, cpu, false, true, false, "--x"), std::exception);
  EXPECT_THROW(use_bf16_weights(Bf16WeightsMode::on, cpu, true, false, false, "--x"), std::exception);
  EXPECT_THROW(use_bf16_weights(Bf16WeightsMode::on, cpu, true, true, true, "--x"), std::exception);
  EXPECT_THROW(parse_bf16_weights("--x", "yes"), std::exception);
}
