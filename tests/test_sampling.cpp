// Sampling speed-ups must not change a pixel: generate_images on the CPU runs chunks side by
// side on single-threaded workers (image i depends on its seed and caption only), and the
// sampler encodes the caption once for all its steps (CaptionContext).
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/autocast.h"
#include "core/cpu_matmul.h"
#include "core/precision.h"
#include "diffusion/edm.h"
#include "eval/sampling.h"
#include "model/microdit.h"
#include "test_util.h"

using namespace microdit;
using namespace microdit::test_util;

TEST(Sampling, ParallelChunksEqualOneImageAtATime) {
  torch::manual_seed(0);
  MicroDiT model(tiny_config());
  model->eval();
  {  // random final layer: the zero-initialised one would make every sample equal
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.normal_(0, 0.05);
  }
  const auto captions = torch::randn({5, 3, tiny_config().caption_channels});  // (N, L, W)
  EDMConfig edm;
  SamplerOptions so;
  so.steps = 3;
  so.cfg = 2.0;
  const int saved = at::get_num_threads();
  at::set_num_threads(2);
  std::vector<int64_t> seen;
  const auto together = generate_images(*model, captions, 7, edm, so, 16, [&](int64_t d) { seen.push_back(d); });
  EXPECT_EQ(at::get_num_threads(), 2);  // the workers' single thread does not leak out
  at::set_num_threads(1);
  const auto alone = generate_images(*model, captions, 7, edm, so, 1);
  at::set_num_threads(saved);
  ASSERT_EQ(together.sizes(), alone.sizes());
  EXPECT_TRUE(torch::allclose(together, alone, 1e-4, 1e-4)) << (together - alone).abs().max().item<double>();
  EXPECT_GT((together[0] - together[1]).abs().max().item<double>(), 1e-3);  // images differ
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back(), 5);  // progress reaches N
}

namespace {

// A tiny model in eval mode with random weights (the zero-initialised final layer would make
// every sample the same), initial noise z (3 images) and captions y (3, 1, 4, W).
struct TinySampling {
  MicroDiT model;
  torch::Tensor z, y;
};
TinySampling tiny_sampling() {
  torch::manual_seed(0);
  const auto& c = tiny_config();
  MicroDiT model(c);
  model->eval();
  {
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.normal_(0, 0.05);
  }
  auto z = torch::randn({3, c.in_channels, c.input_size, c.input_size});
  auto y = torch::randn({3, 1, 4, c.caption_channels});
  return {model, z, y};
}

}  // namespace

// The sampler packs the weights once for its bf16 products on the CPU (core/cpu_matmul.h:
// PackedWeights): the same images as packing them at every product.
TEST(Sampling, PackedWeightsGiveTheSameImages) {
  if (!own_bf16_products()) GTEST_SKIP() << "this CPU's bf16 products stay with oneDNN (no AVX512-BF16, or AMX)";
  const test_util::ScopedSetting<CpuMatmul> own(cpu_fp32_matmul, set_cpu_fp32_matmul, CpuMatmul::kOwn);
  auto [model, z, y] = tiny_sampling();
  torch::NoGradGuard ng;
  const EDMConfig edm;
  const SamplerOptions so{/*steps=*/3, /*cfg=*/3.0};
  AutocastGuard ac(c10::kCPU, true);
  const auto before = packed_weight_stats();
  const auto packed = edm_sample(*model, z, y, edm, so);
  const auto after = packed_weight_stats();
  EXPECT_GT(after.lookups - before.lookups, 4 * (after.packs - before.packs)) << "packs not reused across evaluations";
  const test_util::ScopedSetting<bool> off(pack_weights, set_pack_weights, false);
  EXPECT_TRUE(torch::equal(packed, edm_sample(*model, z, y, edm, so)));
}

TEST(Sampling, CaptionEncodedOnceEqualsEncodedEveryStep) {
  auto [model, z, y] = tiny_sampling();
  torch::NoGradGuard ng;
  const EDMConfig edm;
  const SamplerOptions so{/*steps=*/4, /*cfg=*/3.0};
  const auto once = edm_sample(*model, z, y, edm, so);
  // The sampler by hand, with the caption encoded inside every network evaluation.
  const auto t = sampler_sigmas(so.steps, edm);
  auto denoise = [&](const torch::Tensor& x64, double sigma) {
    auto s = torch::full({1}, sigma);
    return edm_denoise(*model, x64.to(torch::kFloat32), s, y, edm, so.cfg).to(torch::kFloat64);
  };
  auto x = z.to(torch::kFloat64) * t[0];
  for (int i = 0; i < so.steps; ++i) {
    auto d = (x - denoise(x, t[i])) / t[i];
    auto next = x + (t[i + 1] - t[i]) * d;
    if (i < so.steps - 1) next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * (next - denoise(next, t[i + 1])) / t[i + 1]);
    x = next;
  }
  EXPECT_TRUE(torch::equal(once, x.to(torch::kFloat32)));
  EXPECT_GT((once - z * t[0]).abs().max().item<double>(), 1e-3);
  // And a wrong caption batch is a clear error, not a broadcast.
  auto ctx = model->encode_caption(y);
  EXPECT_THROW(model->forward(z.narrow(0, 0, 2), torch::ones({1}), ctx), Error);
}

TEST(Sampling, OneModulationProductEqualsEachBlocksOwn) {
  // Without gradients the model computes every block's adaLN modulation, and the final layer's,
  // in one product with their weights side by side, kept until a weight changes; with gradients
  // each block computes its own. The same output either way, and a changed weight is seen.
  torch::manual_seed(5);
  MicroDiT model(tiny_config());
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.normal_(0.0, 0.1);  // adaLN and output layers start at zero
  }
  const auto& c = tiny_config();
  const auto x = torch::randn({2, c.in_channels, c.input_size, c.input_size}), t = torch::rand({2}),
             y = torch::randn({2, 3, c.caption_channels});
  auto both = [&] {
    const auto each = model->forward(x, t, y).detach();  // gradients on: each block's own product
    torch::NoGradGuard no_grad;
    return std::pair{each, model->forward(x, t, y)};
  };
  const auto [each, one] = both();
  EXPECT_TRUE(torch::allclose(one, each, 1e-5, 1e-6)) << (one - each).abs().max().item<double>();
  {
    torch::NoGradGuard no_grad;
    model->blocks[0]->as<DiTBlockImpl>()->adaLN_modulation->ptr(1)->as<torch::nn::LinearImpl>()->weight.mul_(3);
  }
  const auto [each2, one2] = both();
  EXPECT_TRUE(torch::allclose(one2, each2, 1e-5, 1e-6)) << (one2 - each2).abs().max().item<double>();
  EXPECT_GT((one2 - one).abs().max().item<double>(), 1e-3);  // the new weight was used
}

// SamplerOptions::bf16 (the commands' --precision) runs the network under bf16 autocast, on
// every CPU worker, as a caller's own AutocastGuard does (which bf16 = false leaves in force),
// and leaves the caller's state as it was; float32 images differ from it by rounding only.
TEST(Sampling, Bf16OptionRunsTheNetworkUnderAutocast) {
  auto [model, z, y] = tiny_sampling();
  torch::NoGradGuard ng;
  const auto captions = y.squeeze(1);  // (3, L, W)
  const EDMConfig edm;
  SamplerOptions so;
  so.steps = 3;
  so.cfg = 2.0;
  const int saved = at::get_num_threads();
  at::set_num_threads(2);  // two workers: the autocast state must reach the pool's thread too
  const auto fp32 = generate_images(*model, captions, 3, edm, so, 16);
  Tensor guarded;
  {
    AutocastGuard ac(c10::kCPU, true);
    guarded = generate_images(*model, captions, 3, edm, so, 16);
  }
  so.bf16 = true;
  const auto bf16 = generate_images(*model, captions, 3, edm, so, 16);
  EXPECT_FALSE(at::autocast::is_autocast_enabled(c10::kCPU)) << "the caller's state is restored";
  at::set_num_threads(saved);
  const auto again = generate_images(*model, captions, 3, edm, so, 16);
  EXPECT_TRUE(torch::equal(bf16, again)) << (bf16 - again).abs().max().item<double>();
  EXPECT_TRUE(torch::equal(bf16, guarded)) << (bf16 - guarded).abs().max().item<double>();
  const double diff = (bf16 - fp32).abs().max().item<double>();
  EXPECT_GT(diff, 0) << "the option changed nothing";
  EXPECT_LT(diff, 0.1);
}

// --precision: auto is bf16 where bf16_native says it pays (CUDA; CPUs with AVX512-BF16 or
// AMX), as train.bf16: auto; anything but auto, bf16 or fp32 is a one-line error.
TEST(Sampling, PrecisionChoice) {
  EXPECT_TRUE(sampling_bf16("auto", /*cuda=*/true));
  EXPECT_EQ(sampling_bf16("auto", false), bf16_native(false));
  EXPECT_TRUE(sampling_bf16("bf16", false));
  EXPECT_FALSE(sampling_bf16("fp32", true));
  EXPECT_EQ(error_of([] { sampling_bf16("half", false); }), "--precision: expected auto, bf16 or fp32, got 'half'");
}

// The chunks of generate_images: no more than `batch` images each, every image in one chunk, as
// few rounds of chunks side by side as chunks of `batch` allow, and chunks as small as those
// rounds allow (so the last round is not left to a few workers).
TEST(Sampling, ChunksKeepEveryWorkerBusy) {
  auto plan = [](int64_t n, int64_t b, int t) {
    const auto c = sampling_chunks(n, b, t);
    return std::vector<int64_t>{c.size, c.count};
  };
  EXPECT_EQ(plan(48, 16, 2), (std::vector<int64_t>{12, 4}));  // not 16 + 16 on one worker, 16 on the other
  EXPECT_EQ(plan(40, 16, 2), (std::vector<int64_t>{10, 4}));
  EXPECT_EQ(plan(128, 32, 2), (std::vector<int64_t>{32, 4}));
  EXPECT_EQ(plan(5, 16, 2), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(plan(1, 16, 2), (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(plan(48, 16, 1), (std::vector<int64_t>{16, 3}));  // one thread (and CUDA): chunks of batch
  for (int t : {2, 3, 4})
    for (int64_t b : {1, 3, 16})
      for (int64_t n = 1; n <= 70; ++n) {
        const auto c = sampling_chunks(n, b, t);
        ASSERT_LE(c.size, b);
        ASSERT_GE(c.size * c.count, n);
        ASSERT_LT((c.count - 1) * c.size, n) << "an empty chunk";
        const int64_t rounds = (c.count + t - 1) / t;
        ASSERT_EQ(rounds, ((n + b - 1) / b + t - 1) / t) << n << " " << b << " " << t << ": more rounds than needed";
        ASSERT_LT((c.size - 1) * rounds * t, n) << n << " " << b << " " << t << ": smaller chunks would do";
      }
}
