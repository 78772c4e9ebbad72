#include "diffusion/edm.h"

#include <torch/nn/functional/pooling.h>

#include <cmath>
#include <optional>

#include <ATen/autocast_mode.h>

#include "core/cpu_matmul.h"
#include "core/cuda_graph.h"
#include "core/error.h"

namespace microdit {

Tensor edm_denoise(MicroDiTImpl& model, const Tensor& x, const Tensor& sigma, const Tensor& y,
                   const EDMConfig& edm, double cfg, const TokenMask* mask) {
  model.check_inputs(x, sigma.flatten(), y);
  return edm_denoise(model, x, sigma, model.encode_caption(y, /*with_null=*/cfg != 1.0), edm, cfg, mask);
}

Tensor edm_denoise(MicroDiTImpl& model, const Tensor& x, const Tensor& sigma_in, const CaptionContext& y,
                   const EDMConfig& edm, double cfg, const TokenMask* mask) {
  const double sd = edm.sigma_data;
  auto sigma = sigma_in.to(x.dtype()).reshape({-1, 1, 1, 1});
  auto c_skip = sd * sd / (sigma * sigma + sd * sd);
  auto c_out = sigma * sd / (sigma * sigma + sd * sd).sqrt();
  auto c_in = 1 / (sd * sd + sigma * sigma).sqrt();
  auto c_noise = (sigma.log() / 4).flatten();
  auto xin = c_in * x;
  Tensor F_x;
  if (cfg != 1.0) {
    MD_CHECK(mask == nullptr, "guidance is for sampling, where no tokens are masked");
    F_x = model.forward_cfg(xin, c_noise, y, cfg);
  } else {
    F_x = model.forward(xin, c_noise, y, mask);
  }
  return c_skip * x + c_out * F_x.to(x.dtype());
}

LossDraws draw_loss_randomness(const Tensor& x, double mask_ratio, int patch_size,
                               std::optional<at::Generator> gen) {
  LossDraws d;
  const auto opts = x.options().dtype(torch::kFloat32);
  d.rnd_normal = at::randn({x.size(0), 1, 1, 1}, gen, opts);
  d.noise = at::randn(x.sizes(), gen, opts);
  if (mask_ratio > 0) {
    const int64_t tokens = (x.size(2) / patch_size) * (x.size(3) / patch_size);
    d.mask = random_mask(x.size(0), tokens, mask_ratio, x.device(), gen);
  }
  return d;
}

Tensor edm_loss(MicroDiTImpl& model, const Tensor& x, const Tensor& y, const LossDraws& draws,
                const EDMConfig& edm) {
  const double sd = edm.sigma_data;
  auto sigma = (draws.rnd_normal * edm.P_std + edm.P_mean).exp();  // (B, 1, 1, 1)
  auto weight = (sigma * sigma + sd * sd) / (sigma * sd).pow(2);
  auto n = draws.noise * sigma;
  const TokenMask* mask = draws.mask ? &*draws.mask : nullptr;
  auto D_xn = edm_denoise(model, x + n, sigma, y, edm, 1.0, mask);
  auto loss = weight * (D_xn - x).pow(2);  // (B, C, H, W)
  if (mask) {
    const int64_t p = model.config().patch_size;
    loss = torch::avg_pool2d(loss.mean(1), p).flatten(1);  // (B, T)
    auto keep = 1 - mask->mask;
    loss = (loss * keep).sum(1) / keep.sum(1);  // (B,)
  }
  return loss.mean();
}

std::vector<double> sampler_sigmas(int steps, const EDMConfig& edm) {
  MD_CHECK(steps >= 1, "sampler steps must be >= 1, got {}", steps);
  std::vector<double> t(steps + 1, 0.0);
  const double a = std::pow(edm.sigma_max, 1.0 / edm.rho);
  const double b = std::pow(edm.sigma_min, 1.0 / edm.rho);
  for (int i = 0; i < steps; ++i) {
    const double frac = steps == 1 ? 0.0 : static_cast<double>(i) / (steps - 1);
    t[i] = std::pow(a + frac * (b - a), edm.rho);
  }
  return t;  // t[steps] = 0
}

Solver parse_solver(const std::string& name) {
  if (name == "heun") return Solver::Heun;
  if (name == "euler") return Solver::Euler;
  fail("unknown sampler '{}' (expected heun or euler)", name);
}

Tensor edm_sample(MicroDiTImpl& model, const Tensor& z, const Tensor& y, const EDMConfig& edm,
                  const SamplerOptions& opt, const std::function<void(int, int)>& progress) {
  torch::NoGradGuard no_grad;
  // The weights stay as they are for all 2 x steps - 1 evaluations: the CPU's bf16 products
  // pack each once (core/cpu_matmul.h).
  std::optional<PackedWeights> packed;
  if (z.device().is_cpu()) packed.emplace(model.parameters());
  const auto t = sampler_sigmas(opt.steps, edm);
  const double cfg = opt.cfg > 1.0 ? opt.cfg : 1.0;
  auto f32 = z.options().dtype(torch::kFloat32);
  // The caption's share of the network, once for all 2 x steps - 1 evaluations.
  model.check_inputs(z, torch::ones({1}), y);
  const auto caption = model.encode_caption(y, /*with_null=*/cfg != 1.0);
  std::function<Tensor(const Tensor&, double)> denoise = [&](const Tensor& x64, double sigma) {
    auto s = torch::full({1}, sigma, f32);  // float32, like the reference's t.to(float32)
    return edm_denoise(model, x64.to(torch::kFloat32), s, caption, edm, cfg).to(torch::kFloat64);
  };
  // With a CUDA graph the evaluation reads its input and noise level from tensors that stay
  // put, and writes `out`, which each replay overwrites. Autocast's weight-cast cache is off
  // meanwhile, so the casts are part of the recording rather than tensors cached outside it.
  struct AutocastCacheOff {
    const bool was = at::autocast::is_autocast_cache_enabled();
    AutocastCacheOff() { at::autocast::set_autocast_cache_enabled(false); }
    ~AutocastCacheOff() { at::autocast::set_autocast_cache_enabled(was); }
  };
  std::optional<AutocastCacheOff> cache_off;
  std::unique_ptr<CudaGraphStep> graph;
  Tensor x_in, sigma_in, out;
  if (opt.cuda_graph) {
    MD_CHECK(z.is_cuda(), "the CUDA-graph sampler needs a CUDA device, got {}", z.device().str());
    cache_off.emplace();
    x_in = torch::empty(z.sizes(), f32);
    sigma_in = torch::empty({1}, f32);
    graph = std::make_unique<CudaGraphStep>(
        z.device(), [&] { out = edm_denoise(model, x_in, sigma_in, caption, edm, cfg); }, /*warmup=*/1);
    denoise = [&](const Tensor& x64, double sigma) {
      x_in.copy_(x64);
      sigma_in.fill_(sigma);
      graph->run();
      return out.to(torch::kFloat64);
    };
  }
  auto x = z.to(torch::kFloat64) * t[0];
  for (int i = 0; i < opt.steps; ++i) {
    const double t_cur = t[i], t_next = t[i + 1];
    auto d_cur = (x - denoise(x, t_cur)) / t_cur;
    auto x_next = x + (t_next - t_cur) * d_cur;
    if (opt.solver == Solver::Heun && i < opt.steps - 1) {
      auto d_prime = (x_next - denoise(x_next, t_next)) / t_next;
      x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime);
    }
    x = x_next;
    if (progress) progress(i + 1, opt.steps);
  }
  return x.to(torch::kFloat32);
}

}  // namespace microdit
