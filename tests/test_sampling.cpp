// generate_images on the CPU runs chunks side by side on single-threaded workers: the result
// must not depend on that (image i depends on its seed and caption only).
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

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
