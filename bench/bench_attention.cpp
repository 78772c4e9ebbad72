// Microbenchmarks of CPU attention, forward and backward together, at the shapes of a Nano
// training step on one CPU worker (16 images, 8 heads of 32; the patch mixer's 256 tokens and the
// backbone's 64, each attending to themselves or to 77 caption tokens), on one thread as a
// worker runs: microdit's bf16 kernels on AMX and on AVX512-BF16 and its float32 kernels
// (kernels/attention_cpu.h) against ATen's float32 flash attention and ATen's bf16 one (what
// autocast would run).
//   build/microdit_bench --benchmark_filter=Attention
// AttentionForward times the float32 forward pass alone at the sampler's shapes.
// The figures are in docs/performance.md. The AMX rows skip on CPUs without AMX for bf16, the
// AVX512-BF16 rows on CPUs without it.
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cmath>

#include "kernels/attention_cpu.h"

namespace {

enum Kernel { kAmx, kAvx512Bf16, kFloat32, kAtenFloat32, kAtenBf16 };

void Attention(benchmark::State& state, Kernel kernel) {
  if (kernel == kAmx && !microdit::kernels::cpu::amx_attention_available()) {
    state.SkipWithError("no AMX for bf16 on this CPU");
    return;
  }
  if (kernel == kAvx512Bf16 && !microdit::kernels::cpu::avx512_bf16_attention_available()) {
    state.SkipWithError("no AVX512-BF16 on this CPU");
    return;
  }
  if (kernel == kFloat32 && !microdit::kernels::cpu::avx512_attention_available()) {
    state.SkipWithError("no AVX-512 on this CPU");
    return;
  }
  const int64_t B = 16, H = 8, hd = 32, N = state.range(0), L = state.range(1);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  torch::manual_seed(0);
  const auto dt = kernel == kAtenFloat32 || kernel == kFloat32 ? at::kFloat : at::kBFloat16;
  // (B, H, seq, hd) views of (B, seq, H, hd) tensors, as the model's heads are.
  auto heads = [&](int64_t seq) { return torch::randn({B, seq, H, hd}).to(dt).transpose(1, 2); };
  auto q = heads(N).requires_grad_(), k = heads(L).requires_grad_(), v = heads(L).requires_grad_();
  const auto dout = heads(N).detach();
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  for (auto _ : state) {
    if (kernel == kAmx) {
      namespace kc = microdit::kernels::cpu;
      auto [o, lse] = kc::attention_forward_bf16(q.detach(), k.detach(), v.detach(), scale);
      auto grads = kc::attention_backward_bf16(q.detach(), k.detach(), v.detach(), o, lse, dout, scale);
      benchmark::DoNotOptimize(std::get<0>(grads).data_ptr());
    } else if (kernel == kAvx512Bf16) {
      namespace kc = microdit::kernels::cpu;
      auto [o, lse] = kc::attention_forward_bf16_avx512(q.detach(), k.detach(), v.detach(), scale);
      auto grads = kc::attention_backward_bf16_avx512(q.detach(), k.detach(), v.detach(), o, lse, dout, scale);
      benchmark::DoNotOptimize(std::get<0>(grads).data_ptr());
    } else if (kernel == kFloat32) {
      namespace kc = microdit::kernels::cpu;
      auto [o, lse] = kc::attention_forward_f32(q.detach(), k.detach(), v.detach(), scale);
      auto grads = kc::attention_backward_f32(q.detach(), k.detach(), v.detach(), o, lse, dout, scale);
      benchmark::DoNotOptimize(std::get<0>(grads).data_ptr());
    } else {
      auto o = at::scaled_dot_product_attention(q, k, v);
      auto grads = torch::autograd::grad({o}, {q, k, v}, {dout});
      benchmark::DoNotOptimize(grads[0].data_ptr());
    }
  }
  at::set_num_threads(threads);
  state.SetItemsProcessed(state.iterations() * B * H);  // heads
}

void Shapes(benchmark::internal::Benchmark* b) {
  for (auto [n, l] : {std::pair<int64_t, int64_t>{256, 256}, {256, 77}, {64, 64}, {64, 77}}) b->Args({n, l});
  b->ArgNames({"N", "L"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

// The float32 forward pass alone, without the log-sum-exp, as the sampler runs it: the emoji
// sampler's heads (32 images with guidance, 4 heads of 32; 64 tokens attending to themselves or
// to 21 caption tokens) and Nano's. One thread.
void AttentionForward(benchmark::State& state) {
  if (!microdit::kernels::cpu::avx512_attention_available()) {
    state.SkipWithError("no AVX-512 on this CPU");
    return;
  }
  const int64_t B = state.range(2), H = state.range(3), hd = 32, N = state.range(0), L = state.range(1);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  torch::manual_seed(0);
  auto heads = [&](int64_t seq) { return torch::randn({B, seq, H, hd}).transpose(1, 2); };
  auto q = heads(N), k = heads(L), v = heads(L);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  for (auto _ : state) {
    auto [o, lse] = microdit::kernels::cpu::attention_forward_f32(q, k, v, scale, /*with_lse=*/false);
    benchmark::DoNotOptimize(o.data_ptr());
  }
  at::set_num_threads(threads);
  state.SetItemsProcessed(state.iterations() * B * H);  // heads
}

}  // namespace

BENCHMARK_CAPTURE(Attention, amx_bf16, kAmx)->Apply(Shapes);
BENCHMARK_CAPTURE(Attention, avx512_bf16, kAvx512Bf16)->Apply(Shapes);
BENCHMARK_CAPTURE(Attention, float32, kFloat32)->Apply(Shapes);
BENCHMARK_CAPTURE(Attention, aten_float32, kAtenFloat32)->Apply(Shapes);
BENCHMARK_CAPTURE(Attention, aten_bf16, kAtenBf16)->Apply(Shapes);
BENCHMARK(AttentionForward)
    ->Args({64, 64, 32, 4})
    ->Args({64, 21, 32, 4})
    ->Args({256, 256, 16, 8})
    ->Args({64, 77, 16, 8})
    ->ArgNames({"N", "L", "B", "H"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
