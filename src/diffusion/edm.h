// EDM formulation (Karras et al. 2022) as the reference uses it: preconditioning, the
// training loss with and without deferred masking, and the deterministic Heun/Euler sampler
// with classifier-free guidance. Random draws are explicit so tests can pin them.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "model/microdit.h"

namespace microdit {

struct EDMConfig {
  double sigma_data = 0.9;
  double P_mean = -0.6, P_std = 1.2;  // log-normal training noise levels
  double sigma_min = 0.002, sigma_max = 80.0, rho = 7.0;
};

// D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4, y). sigma: (B,) or (1,) float32.
// cfg != 1 runs the guided network; mask (training only) drops tokens in the backbone.
Tensor edm_denoise(MicroDiTImpl& model, const Tensor& x, const Tensor& sigma, const Tensor& y,
                   const EDMConfig& edm, double cfg = 1.0, const TokenMask* mask = nullptr);
// The same with the caption encoded beforehand: model.encode_caption(y, cfg != 1).
Tensor edm_denoise(MicroDiTImpl& model, const Tensor& x, const Tensor& sigma, const CaptionContext& y,
                   const EDMConfig& edm, double cfg = 1.0, const TokenMask* mask = nullptr);

// The random draws of one loss evaluation.
struct LossDraws {
  Tensor rnd_normal;  // (B, 1, 1, 1): sigma = exp(P_mean + P_std n)
  Tensor noise;       // (B, C, H, W): eps
  std::optional<TokenMask> mask;  // set when mask_ratio > 0
};
LossDraws draw_loss_randomness(const Tensor& x, double mask_ratio, int patch_size,
                               std::optional<at::Generator> gen = std::nullopt);

// weight (D(x + sigma eps) - x)^2 with weight = (sigma^2 + sd^2)/(sigma sd)^2; the mean over
// everything, or with a mask the per-token (p x p pooled, channel-mean) loss averaged over
// kept tokens per sample, then over the batch. Returns a scalar.
Tensor edm_loss(MicroDiTImpl& model, const Tensor& x, const Tensor& y, const LossDraws& draws,
                const EDMConfig& edm);

// t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then t_N = 0.
std::vector<double> sampler_sigmas(int steps, const EDMConfig& edm);

enum class Solver { Heun, Euler };
Solver parse_solver(const std::string& name);

struct SamplerOptions {
  int steps = 30;
  double cfg = 1.0;  // guidance runs when cfg > 1, as in the reference sampler
  Solver solver = Solver::Heun;
  // On a CUDA device: record one network evaluation into a CUDA graph and replay it for the
  // 2 x steps - 1 evaluations (core/cuda_graph.h); the same images up to float rounding.
  bool cuda_graph = false;
  // true: generate_images runs the network under bf16 autocast (the sampler's state stays
  // float64); false leaves the caller's autocast state. Commands set it from --precision
  // (core/precision.h sampling_bf16).
  bool bf16 = false;
};

// From initial unit noise z (B, C, H, W): x = z t_0 in float64, network in float32.
// Returns float32 (B, C, H, W). `progress(i, n)` is called after each step when set.
Tensor edm_sample(MicroDiTImpl& model, const Tensor& z, const Tensor& y, const EDMConfig& edm,
                  const SamplerOptions& opt,
                  const std::function<void(int, int)>& progress = nullptr);

}  // namespace microdit
