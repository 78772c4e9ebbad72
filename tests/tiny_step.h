// One training step of a tiny MicroDiT, for the tests that compare ways of computing the same
// gradients (tests/test_parallel_backward.cpp, tests/test_recompute.cpp).
#pragma once
#include <torch/torch.h>

#include <functional>

#include "core/autocast.h"
#include "diffusion/edm.h"
#include "model/microdit.h"
#include "test_util.h"
#include "train/parallel_backward.h"

namespace microdit::test_util {

struct TinyStepOptions {
  int64_t rows = 4;
  int workers = 1;          // parallel_backward's row slices
  double scale = 1.0;       // parallel_backward's gradient scale
  bool bf16 = false;        // autocast for the forward pass
  bool recompute = false;   // activation checkpointing
  bool accumulate = false;  // start from .grad = 1 everywhere
};

struct TinyStep {
  double loss = 0;
  std::vector<torch::Tensor> grads;  // one per parameter (zeros where unused)
};

// Pico (expert-choice MoE in alternate blocks, 2 mixer blocks) at 8x8 with small random
// weights (the reference's zero-initialised output layers would make most gradients zero), on
// fixed random rows with mask 0.5. `inspect` sees the loss of the slice starting at row 0.
inline TinyStep tiny_step(const TinyStepOptions& o,
                          const std::function<void(const torch::Tensor&)>& inspect = nullptr) {
  torch::manual_seed(0);
  const auto c = tiny_config();
  MicroDiT model(c);
  small_random_weights(*model);
  model->recompute_blocks = o.recompute;
  const int64_t B = o.rows;
  auto x = torch::randn({B, c.in_channels, c.input_size, c.input_size});
  auto y = torch::randn({B, 1, 5, c.caption_channels});
  auto rnd = torch::randn({B, 1, 1, 1}), noise = torch::randn(x.sizes()), mask_noise = torch::rand({B, c.num_tokens()});
  const auto params = model->parameters();
  if (o.accumulate)
    for (const auto& p : params) const_cast<torch::Tensor&>(p).mutable_grad() = torch::ones_like(p);
  EDMConfig edm;
  TinyStep r;
  r.loss = parallel_backward(params, B, o.workers, o.scale, [&](int64_t s, int64_t n) {
    LossDraws d;
    d.rnd_normal = rnd.narrow(0, s, n);
    d.noise = noise.narrow(0, s, n);
    d.mask = mask_from_noise(mask_noise.narrow(0, s, n), c.kept_tokens(0.5));
    AutocastGuard autocast(c10::kCPU, o.bf16);
    auto loss = edm_loss(*model, x.narrow(0, s, n), y.narrow(0, s, n), d, edm);
    if (s == 0 && inspect) inspect(loss);
    return loss;
  }).item<double>();
  for (const auto& p : params) r.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return r;
}

// The largest difference of two steps' gradients, relative to each parameter's largest |a|.
inline double worst_relative(const TinyStep& a, const TinyStep& b) {
  double worst = 0;
  for (size_t i = 0; i < a.grads.size(); ++i)
    worst = std::max(worst, (a.grads[i] - b.grads[i]).abs().max().item<double>() /
                                std::max(1e-6, a.grads[i].abs().max().item<double>()));
  return worst;
}

inline double largest_gradient(const TinyStep& s) {
  double largest = 0;
  for (const auto& g : s.grads) largest = std::max(largest, g.abs().max().item<double>());
  return largest;
}

}  // namespace microdit::test_util
