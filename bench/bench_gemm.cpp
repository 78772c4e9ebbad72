// Microbenchmarks of float32 CPU products at the shapes of a Nano training step on one CPU
// worker (16 images: 4,096 rows in the patch mixer, 1,024 in the backbone), on one thread as a
// worker runs: microdit's own kernels (kernels/gemm_cpu.h) against MKL (at::mm), for the three
// products of a linear layer (y = x W^T, dx = dy W, dW = dy^T x).
//   build/microdit_bench --benchmark_filter=Gemm
// GemmGelu times the expert FFN's second product with GELU on its input: inside the product
// (packed through GELU) against LibTorch's gelu, then the product. The figures are in
// docs/performance.md.
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "kernels/gemm_cpu.h"

namespace {

namespace kc = microdit::kernels::cpu;

// The rate of `state`'s iterations of one (M x K) @ (K x N) product.
void count_flops(benchmark::State& state, int64_t M, int64_t N, int64_t K) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(M * N * K) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

enum Layout { kForward, kInputGrad, kWeightGrad };

// One thread for a benchmark's scope, as a CPU worker runs.
struct OneThread {
  int was = at::get_num_threads();
  OneThread() { at::set_num_threads(1); }
  ~OneThread() { at::set_num_threads(was); }
};

// C (M, N) = A (M, K) B (K, N): one of a linear layer's products (state's layout, rows, in, out)
// on random operands of `dtype`, as the model lays them out (y = x W^T, dx = dy W, dW = dy^T x).
struct LayerProduct {
  torch::Tensor A, B;
  int64_t M, N, K;
  Layout layout;
};
LayerProduct layer_product(const benchmark::State& state, torch::ScalarType dtype) {
  const auto layout = static_cast<Layout>(state.range(0));
  const int64_t rows = state.range(1), in = state.range(2), out = state.range(3);
  torch::manual_seed(0);
  const auto x = torch::randn({rows, in}).to(dtype), w = torch::randn({out, in}).to(dtype);
  const auto dy = torch::randn({rows, out}).to(dtype);
  auto A = layout == kForward ? x : layout == kInputGrad ? dy : dy.t();
  auto B = layout == kForward ? w.t() : layout == kInputGrad ? w : x;
  return {A, B, A.size(0), B.size(1), A.size(1), layout};
}

// rows x in -> out: the operands of one of the layer's products, as the model lays them out.
void Gemm(benchmark::State& state, bool own) {
  if (own && !kc::gemm_f32_available()) {
    state.SkipWithError("no AVX-512 on this CPU");
    return;
  }
  const OneThread one;
  const auto [A, B, M, N, K, layout] = layer_product(state, torch::kFloat);
  auto C = torch::empty({M, N});
  for (auto _ : state) {
    if (own) {
      kc::gemm_f32(M, N, K, {A.data_ptr<float>(), A.stride(0), A.stride(1)}, {B.data_ptr<float>(), B.stride(0), B.stride(1)},
                   C.data_ptr<float>(), N, false, nullptr);
    } else {
      at::mm_out(C, A, B);
    }
    benchmark::DoNotOptimize(C.data_ptr());
  }
  count_flops(state, M, N, K);
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"layout", "rows", "in", "out"})->Unit(benchmark::kMicrosecond);
  for (int layout : {kForward, kInputGrad, kWeightGrad}) {
    b->Args({layout, 4096, 256, 768});   // the mixer's qkv
    b->Args({layout, 4096, 256, 256});   // the mixer's projection
    b->Args({layout, 1024, 256, 1024});  // an expert's first layer (a token per row)
    b->Args({layout, 1024, 1024, 256});  // an expert's second layer
  }
}

// GELU(a) @ w for one expert (1,024 tokens, 1,024 hidden, 256 out).
void GemmGelu(benchmark::State& state, bool fused) {
  if (!kc::gemm_f32_available()) {
    state.SkipWithError("no AVX-512 on this CPU");
    return;
  }
  const OneThread one;
  torch::manual_seed(0);
  const auto a = torch::randn({1024, 1024}), w = torch::randn({1024, 256});
  auto C = torch::empty({1024, 256});
  for (auto _ : state) {
    const auto h = fused ? a : at::gelu(a);
    kc::GemmExtras extras;
    extras.gelu_a = fused;
    kc::gemm_f32(1024, 256, 1024, {h.data_ptr<float>(), 1024, 1}, {w.data_ptr<float>(), 256, 1}, C.data_ptr<float>(),
                 256, false, nullptr, extras);
    benchmark::DoNotOptimize(C.data_ptr());
  }
}

// bf16 products at the main job's shapes (Pico, one worker's 16 images: 128 rows in the backbone,
// 256 in the mixer, 336 caption rows): microdit's AVX512-BF16 kernels against oneDNN (at::mm on
// bf16 tensors), operands and result in bf16 as under autocast.
void GemmBf16(benchmark::State& state, bool own) {
  if (own && !kc::gemm_bf16_available()) {
    state.SkipWithError("no AVX512-BF16 on this CPU");
    return;
  }
  const OneThread one;
  const auto [A, B, M, N, K, layout] = layer_product(state, torch::kBFloat16);
  // The weight gradient in float32 (the parameter's dtype: a bf16 product cast back), the others in bf16.
  auto C = torch::empty({M, N}, layout == kWeightGrad ? torch::kFloat : torch::kBFloat16);
  for (auto _ : state) {
    if (own) {
      kc::gemm_bf16(M, N, K, {A.data_ptr(), A.stride(0), A.stride(1), true}, {B.data_ptr(), B.stride(0), B.stride(1), true},
                    C.data_ptr(),
                    C.scalar_type() == torch::kBFloat16 ? kc::Bf16Out::kBf16 : kc::Bf16Out::kFloatOfBf16, N, false, nullptr);
    } else if (layout == kWeightGrad) {
      C.copy_(at::mm(A, B));  // autocast's way: a bf16 product, cast to float32
    } else {
      at::mm_out(C, A, B);
    }
    benchmark::DoNotOptimize(C.data_ptr());
  }
  count_flops(state, M, N, K);
}

void SmallShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"layout", "rows", "in", "out"})->Unit(benchmark::kMicrosecond);
  for (int layout : {kForward, kInputGrad, kWeightGrad}) {
    b->Args({layout, 128, 128, 128});   // a backbone block's projection
    b->Args({layout, 128, 128, 384});   // its qkv
    b->Args({layout, 128, 128, 512});   // an FFN's first layer
    b->Args({layout, 256, 128, 128});   // the mixer's projection
    b->Args({layout, 336, 128, 1536});  // every block's caption keys and values
    b->Args({layout, 4096, 256, 768});  // Nano's mixer qkv (one worker, 16 images)
    b->Args({layout, 1024, 1024, 256}); // an expert's second layer
  }
}

}  // namespace

BENCHMARK_CAPTURE(GemmBf16, microdit, true)->Apply(SmallShapes);
BENCHMARK_CAPTURE(GemmBf16, onednn, false)->Apply(SmallShapes);
BENCHMARK_CAPTURE(Gemm, microdit, true)->Apply(Shapes);
BENCHMARK_CAPTURE(Gemm, mkl, false)->Apply(Shapes);
BENCHMARK_CAPTURE(GemmGelu, fused, true)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(GemmGelu, libtorch_gelu_first, false)->Unit(benchmark::kMicrosecond);
