#include "model/layers.h"

#include <torch/nn/functional/normalization.h>
#include <torch/nn/modules/activation.h>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>
#include <cmath>

#include "core/cpu_matmul.h"
#include "core/error.h"
#include "model/fused.h"

namespace microdit {

namespace F = torch::nn::functional;

LayerNormImpl::LayerNormImpl(int64_t dim, double eps, bool affine) : dim(dim), eps(eps) {
  if (affine) weight = register_parameter("weight", torch::ones({dim}));
}

static std::atomic<bool> g_fused_kernels{true};

void set_fused_kernels(bool on) { g_fused_kernels = on; }
bool fused_kernels_enabled() { return g_fused_kernels; }

Tensor gated_residual(const Tensor& x, const Tensor& gate, Tensor h) {
  if (g_fused_kernels && fused_kernels_apply(x) && fused_kernels_apply(h) && fused_kernels_apply(gate))
    return fused_gated_residual(x, gate, std::move(h));
  return x + gate.unsqueeze(1) * h;
}

std::pair<at::ScalarType, at::ScalarType> LayerNormImpl::fused_dtypes(const Tensor& x) const {
  // Under autocast the result goes straight to a matmul or attention that autocast would cast
  // to its dtype: produce that dtype. Low precision also keeps x (and takes its statistics)
  // in that dtype, as the LibTorch path below does.
  const auto dev = x.device().type();
  const bool autocast = at::autocast::is_autocast_enabled(dev);
  const auto out = autocast ? at::autocast::get_autocast_dtype(dev) : x.scalar_type();
  return {out, low_precision && autocast ? out : x.scalar_type()};
}

Tensor LayerNormImpl::forward_fused(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  const auto [out, save] = fused_dtypes(x);
  return fused_modulated_layer_norm(x, weight, shift, scale, eps, out, save);
}

std::pair<Tensor, Tensor> LayerNormImpl::forward_residual(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  if (g_fused_kernels && x.dim() == 3 && fused_kernels_apply(x) && torch::GradMode::is_enabled() &&
      x.requires_grad()) {
    const auto [out, save] = fused_dtypes(x);
    return fused_residual_layer_norm(x, weight, shift, scale, eps, out, save);
  }
  return {x, shift.defined() ? forward_modulated(x, shift, scale) : forward(x)};
}

// Whether the float32 sampling passes (model/fused.h) may take x: fused kernels on, nothing
// recording gradients, and no autocast (the norm's result and saved dtypes float32).
bool LayerNormImpl::sampling_float32(const Tensor& x) const {
  return g_fused_kernels && !torch::GradMode::is_enabled() && fused_dtypes(x) == std::make_pair(at::kFloat, at::kFloat);
}

std::pair<Tensor, Tensor> LayerNormImpl::forward_after_add(const Tensor& x, const Tensor& gate, Tensor h,
                                                           const Tensor& shift, const Tensor& scale) {
  if (sampling_float32(x) && fused_residual_norm_applies(x, gate, h, weight, shift, scale))
    return fused_residual_norm(x, gate, std::move(h), weight, shift, scale, eps);
  return forward_residual(gate.defined() ? gated_residual(x, gate, std::move(h)) : x + h, shift, scale);
}

Tensor LayerNormImpl::forward_in_place(const Tensor& x) {
  if (sampling_float32(x) && fused_norm_in_place_applies(x, weight)) {
    fused_norm_in_place(x, weight, eps);
    return x;
  }
  return forward(x);
}

Tensor LayerNormImpl::forward_modulated(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  if (g_fused_kernels && x.dim() == 3 && fused_kernels_apply(x)) return forward_fused(x, shift, scale);
  return modulate(forward(x), shift, scale);
}

Tensor LayerNormImpl::forward(const Tensor& x) {
  if (g_fused_kernels && fused_kernels_apply(x)) return forward_fused(x, {}, {});
  const auto dev = x.device().type();
  if (low_precision && at::autocast::is_autocast_enabled(dev)) {
    const auto dt = at::autocast::get_autocast_dtype(dev);
    // Autocast would cast layer_norm's inputs back to float32: step past it for this call.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(
        c10::DispatchKeySet({c10::DispatchKey::AutocastCUDA, c10::DispatchKey::AutocastCPU}));
    return at::layer_norm(x.to(dt), {dim}, weight.defined() ? weight.to(dt) : weight, /*bias=*/{}, eps);
  }
  return at::layer_norm(x, {dim}, weight, /*bias=*/{}, eps);
}

void set_low_precision_layernorm(torch::nn::Module& m, bool on) {
  for (auto& sub : m.modules(/*include_self=*/true))
    if (auto* ln = sub->as<LayerNormImpl>()) ln->low_precision = on;
}

Linear make_linear(int64_t in, int64_t out, bool bias) {
  return Linear(torch::nn::LinearOptions(in, out).bias(bias));
}

static torch::nn::GELU gelu_tanh() {
  return torch::nn::GELU(torch::nn::GELUOptions().approximate("tanh"));
}

MlpImpl::MlpImpl(int64_t in, int64_t hidden, int64_t out, double eps) {
  fc1 = register_module("fc1", make_linear(in, hidden, true));
  norm = register_module("norm", LayerNorm(hidden, eps));
  fc2 = register_module("fc2", make_linear(hidden, out, true));
}

Tensor MlpImpl::forward(const Tensor& x) {
  return fc2(norm(at::gelu(fc1(x), "tanh")));
}

PatchEmbedImpl::PatchEmbedImpl(int64_t in_channels, int64_t dim, int64_t patch) {
  proj = register_module(
      "proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels, dim, patch).stride(patch)));
}

Tensor PatchEmbedImpl::forward(const Tensor& x) {
  const auto& w = proj->weight;  // (D, C, p, p)
  if (x.is_cpu() && torch::GradMode::is_enabled() && x.dim() == 4) {
    // Training on the CPU: the same weights as a product over the patches, (B, T, C p p) @
    // (C p p, D). oneDNN's strided convolution took 7.0 ms forward and backward at Nano's shapes
    // (batch 16, one thread), the copy and the product 1.7 ms; without gradients it is the faster
    // one (sampling), and CUDA keeps it too.
    const int64_t B = x.size(0), C = x.size(1), p = w.size(2), h = x.size(2) / p, wd = x.size(3) / p;
    MD_CHECK(C == w.size(1) && x.size(2) == h * p && x.size(3) == wd * p,
             "patch embedding: input (B, {}, {}, {}) does not tile into {}x{} patches of {} channels", C,
             x.size(2), x.size(3), p, p, w.size(1));
    const auto patches = x.reshape({B, C, h, p, wd, p}).permute({0, 2, 4, 1, 3, 5}).reshape({B, h * wd, C * p * p});
    return microdit::linear(patches, w.view({w.size(0), C * p * p}), proj->bias);  // (B, T, D)
  }
  return proj(x).flatten(2).transpose(1, 2);  // (B, D, h, w) -> (B, h*w, D)
}

TimestepEmbedderImpl::TimestepEmbedderImpl(int64_t dim) {
  mlp = register_module("mlp", torch::nn::Sequential(make_linear(kFrequencies, dim, true),
                                                     gelu_tanh(), make_linear(dim, dim, true)));
}

Tensor TimestepEmbedderImpl::forward(const Tensor& t) {
  auto w = mlp->ptr(0)->as<torch::nn::LinearImpl>()->weight;
  return mlp->forward(timestep_features(t).to(w.dtype()));
}

Tensor timestep_features(const Tensor& t, int64_t dim) {
  const int64_t half = dim / 2;
  // Same float32 operations, in the same order, as the reference.
  auto freqs = torch::exp(-std::log(10000.0) *
                          torch::arange(0, half, torch::dtype(torch::kFloat32).device(t.device())) /
                          static_cast<double>(half));
  auto args = t.unsqueeze(1).to(torch::kFloat32) * freqs.unsqueeze(0);  // (B, half)
  auto emb = torch::cat({torch::cos(args), torch::sin(args)}, -1);
  if (dim % 2) emb = torch::cat({emb, torch::zeros_like(emb.narrow(1, 0, 1))}, -1);
  return emb;
}

// [sin(pos*w), cos(pos*w)] with w_k = 10000^(-k/(dim/2)), pos (M,) float64 -> (M, dim).
static Tensor sincos_1d(int64_t dim, const Tensor& pos) {
  auto omega = torch::arange(dim / 2, torch::kFloat64) / (dim / 2.0);
  omega = 1.0 / torch::pow(10000.0, omega);
  auto out = pos.reshape({-1, 1}) * omega.reshape({1, -1});  // (M, dim/2)
  return torch::cat({torch::sin(out), torch::cos(out)}, 1);
}

Tensor sincos_pos_embed_2d(int64_t dim, int64_t grid, int64_t base, double interp_scale) {
  // Coordinates in float32 as the reference computes them, then float64 for the table.
  auto coord = torch::arange(grid, torch::kFloat32) / (static_cast<double>(grid) / base) /
               interp_scale;  // (g,)
  auto rows = coord.reshape({grid, 1}).expand({grid, grid}).reshape(-1).to(torch::kFloat64);
  auto cols = coord.reshape({1, grid}).expand({grid, grid}).reshape(-1).to(torch::kFloat64);
  auto table = torch::cat({sincos_1d(dim / 2, cols), sincos_1d(dim / 2, rows)}, 1);
  return table.to(torch::kFloat32);  // (g*g, dim)
}

}  // namespace microdit
