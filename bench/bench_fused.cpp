// Microbenchmarks of the fused CPU kernels (kernels/fused.h) against LibTorch's operators for
// the same expressions, forward and backward, at the shapes of a Nano training step on the
// CPU (batch 32, mask 0.75: 2,048 backbone tokens; the patch mixer sees 8,192).
//   build/microdit_bench [--benchmark_filter=SwiGLU]
// The figures are in docs/performance.md.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "kernels/fused.h"
#include "model/fused.h"
#include "model/layers.h"

namespace {

using microdit::Tensor;

at::ScalarType dtype_of(const benchmark::State& s) { return s.range(0) ? at::kBFloat16 : at::kFloat; }

// silu(u) * v and its backward pass, rows x n.
void SwiGLU(benchmark::State& state, bool fused) {
  const int64_t rows = state.range(1), n = state.range(2);
  torch::manual_seed(0);
  auto u = torch::randn({rows, n}).to(dtype_of(state)).requires_grad_(true);
  auto v = torch::randn({rows, n}).to(dtype_of(state)).requires_grad_(true);
  auto dp = torch::randn({rows, n}).to(dtype_of(state));
  for (auto _ : state) {
    auto p = fused ? microdit::fused_swiglu(u, v) : torch::silu(u) * v;
    p.backward(dp);
    benchmark::DoNotOptimize(u.grad().data_ptr());
    u.mutable_grad() = Tensor();
    v.mutable_grad() = Tensor();
  }
  state.SetBytesProcessed(state.iterations() * rows * n * u.element_size() * 8);  // fused: 3 + 5 passes
}

// LN(x) * w * (1 + scale[b]) + shift[b] and its backward pass, x (B, T, d).
void ModulatedLayerNorm(benchmark::State& state, bool fused) {
  const int64_t B = 32, T = state.range(1) / 32, d = state.range(2);
  const auto dt = dtype_of(state);
  torch::manual_seed(0);
  auto x = torch::randn({B, T, d}).to(dt).requires_grad_(true);
  auto w = torch::rand({d}).add_(0.5).requires_grad_(true);
  auto shift = torch::randn({B, d}).to(dt).requires_grad_(true);
  auto scale = torch::randn({B, d}).to(dt).requires_grad_(true);
  auto dy = torch::randn({B, T, d}).to(dt);
  for (auto _ : state) {
    Tensor y;
    if (fused) {
      y = microdit::fused_modulated_layer_norm(x, w, shift, scale, 1e-6, dt, dt);
    } else {
      y = microdit::modulate(at::layer_norm(x, {d}, w.to(dt), {}, 1e-6), shift, scale);
    }
    y.backward(dy);
    benchmark::DoNotOptimize(x.grad().data_ptr());
    for (auto* t : {&x, &w, &shift, &scale}) t->mutable_grad() = Tensor();
  }
  state.SetBytesProcessed(state.iterations() * B * T * d * x.element_size() * 5);  // fused: 2 + 3 passes
}

// x + gate[b] * h and its backward pass, x (B, T, d).
void GatedResidual(benchmark::State& state, bool fused) {
  const int64_t B = 32, T = state.range(1) / 32, d = state.range(2);
  const auto dt = dtype_of(state);
  torch::manual_seed(0);
  auto x = torch::randn({B, T, d}).to(dt).requires_grad_(true);
  auto gate = torch::randn({B, d}).to(dt).requires_grad_(true);
  auto h = torch::randn({B, T, d}).to(dt).requires_grad_(true);
  auto dout = torch::randn({B, T, d}).to(dt);
  for (auto _ : state) {
    auto out = fused ? microdit::fused_gated_residual(x, gate, h) : x + gate.unsqueeze(1) * h;
    out.backward(dout);
    benchmark::DoNotOptimize(h.grad().data_ptr());
    for (auto* t : {&x, &gate, &h}) t->mutable_grad() = Tensor();
  }
  state.SetBytesProcessed(state.iterations() * B * T * d * x.element_size() * 6);  // fused: 3 + 3 passes
}

// The CPU LayerNorm kernels alone (no autograd, one thread): the modulated forward pass and
// the dx pass, float32, (32, rows / 32, d) with per-sample shift and scale. Rows of 128 and
// 256 are the emoji sampler's and Nano's; 2,048 rows of them fit in a core's L2, so these
// time the kernels' arithmetic rather than memory.
void LayerNormKernel(benchmark::State& state, bool dx) {
  namespace k = microdit::kernels;
  const int64_t rows = state.range(0), d = state.range(1), B = 32, T = rows / B;
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  torch::manual_seed(0);
  auto x = torch::randn({rows, d}), dy = torch::randn({rows, d}), y = torch::empty({rows, d});
  auto w = torch::rand({d}).add_(0.5), shift = torch::randn({B, d}), scale = torch::randn({B, d});
  auto mean = torch::empty({rows}), rstd = torch::empty({rows});
  const auto f = k::DType::f32;
  auto forward = [&] {
    k::cpu::modln_forward(x.data_ptr(), d, f, nullptr, f, w.data_ptr<float>(), shift.data_ptr(), scale.data_ptr(),
                          y.data_ptr(), f, mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, T, d, 1e-6f);
  };
  forward();
  for (auto _ : state) {
    if (dx)
      k::cpu::modln_backward_dx(dy.data_ptr(), f, x.data_ptr(), d, f, w.data_ptr<float>(), scale.data_ptr(),
                                mean.data_ptr<float>(), rstd.data_ptr<float>(), y.data_ptr(), d, f, nullptr, rows,
                                T, d);
    else
      forward();
    benchmark::DoNotOptimize(y.data_ptr());
  }
  at::set_num_threads(threads);
  state.SetBytesProcessed(state.iterations() * rows * d * 4 * (dx ? 3 : 2));
}

// Arguments: {bf16?, rows, width}: the backbone's and the patch mixer's token counts.
void Shapes(benchmark::internal::Benchmark* b, int64_t width) {
  for (int64_t bf16 : {0, 1})
    for (int64_t rows : {2048, 8192}) b->Args({bf16, rows, width});
  b->ArgNames({"bf16", "rows", "d"})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK_CAPTURE(SwiGLU, fused, true)->Apply([](auto* b) { Shapes(b, 704); });
BENCHMARK_CAPTURE(SwiGLU, libtorch, false)->Apply([](auto* b) { Shapes(b, 704); });
BENCHMARK_CAPTURE(ModulatedLayerNorm, fused, true)->Apply([](auto* b) { Shapes(b, 256); });
BENCHMARK_CAPTURE(ModulatedLayerNorm, libtorch, false)->Apply([](auto* b) { Shapes(b, 256); });
BENCHMARK_CAPTURE(LayerNormKernel, forward, false)
    ->ArgsProduct({{2048}, {128, 256}})
    ->ArgNames({"rows", "d"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(LayerNormKernel, dx, true)
    ->ArgsProduct({{2048}, {128, 256}})
    ->ArgNames({"rows", "d"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(GatedResidual, fused, true)->Apply([](auto* b) { Shapes(b, 256); });
BENCHMARK_CAPTURE(GatedResidual, libtorch, false)->Apply([](auto* b) { Shapes(b, 256); });

BENCHMARK_MAIN();
