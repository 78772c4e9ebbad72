// Data parallelism inside one process (train/parallel_backward.h): row slices of a batch on
// side-by-side CPU workers give the gradients and loss of one pass over the whole batch.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/cpu_matmul.h"
#include "tiny_step.h"

using namespace microdit;
using namespace microdit::test_util;

namespace {

// 7 rows, gradient scale 0.5, split over `workers`.
TinyStep step(int workers, bool bf16, bool accumulate = false) {
  TinyStepOptions o;
  o.rows = 7;
  o.workers = workers;
  o.scale = 0.5;
  o.bf16 = bf16;
  o.accumulate = accumulate;
  return tiny_step(o);
}

}  // namespace

TEST(ParallelBackward, SlicesGiveTheWholeBatchGradient) {
  const auto one = step(1, false);
  ASSERT_GT(largest_gradient(one), 1e-4) << "the gradients must not be trivially zero";
  for (int workers : {2, 3, 7}) {
    const auto split = step(workers, false);
    EXPECT_NEAR(split.loss, one.loss, 1e-6 * std::abs(one.loss)) << workers << " workers";
    EXPECT_LT(worst_relative(one, split), 1e-4) << workers << " workers";
  }
}

TEST(ParallelBackward, AddsToExistingGradientsAndKeepsAutocast) {
  const auto fresh = step(2, false), added = step(2, false, /*accumulate=*/true);
  for (size_t i = 0; i < fresh.grads.size(); ++i)
    ASSERT_TRUE(torch::allclose(added.grads[i], fresh.grads[i] + 1, 1e-5, 1e-6)) << "parameter " << i;
  // bf16 autocast reaches the workers: their gradients differ from fp32's by bf16 rounding,
  // and agree with one bf16 pass over the whole batch.
  const auto bf_one = step(1, true), bf_split = step(2, true), fp = step(2, false);
  EXPECT_GT(worst_relative(fp, bf_split), 1e-4) << "autocast did not reach the workers";
  EXPECT_LT(worst_relative(bf_one, bf_split), 0.1);
}

TEST(ParallelBackward, IsDeterministic) {
  const auto a = step(3, false), b = step(3, false);
  for (size_t i = 0; i < a.grads.size(); ++i) ASSERT_TRUE(torch::equal(a.grads[i], b.grads[i]));
}

// The workers of a step share one pack of each weight for their bf16 products (core/cpu_matmul.h:
// PackedWeights): the loss and gradients are those of packing at every product, bit for bit.
TEST(ParallelBackward, PackedWeightsGiveTheSameGradients) {
  if (!own_bf16_products()) GTEST_SKIP() << "this CPU's bf16 products stay with oneDNN (no AVX512-BF16, or AMX)";
  const auto before = packed_weight_stats();
  const auto packed = step(2, true);
  const auto after = packed_weight_stats();
  EXPECT_GT(after.packs, before.packs);
  EXPECT_GT(after.lookups - before.lookups, after.packs - before.packs) << "no pack was read twice";
  TinyStep each;
  {
    const ScopedSetting<bool> off(pack_weights, set_pack_weights, false);
    each = step(2, true);
    EXPECT_EQ(packed_weight_stats().lookups, after.lookups);
  }
  EXPECT_EQ(packed.loss, each.loss);
  for (size_t i = 0; i < packed.grads.size(); ++i) ASSERT_TRUE(torch::equal(packed.grads[i], each.grads[i])) << "parameter " << i;
}

TEST(ParallelBackward, WorkerCounts) {
  EXPECT_EQ(resolve_cpu_workers(1, c10::Device("cpu"), false), 1);
  EXPECT_EQ(resolve_cpu_workers(3, c10::Device("cpu"), false), 3);
  EXPECT_EQ(resolve_cpu_workers(0, c10::Device("cpu"), true), 1);
  EXPECT_EQ(resolve_cpu_workers(0, c10::Device("cpu"), false), at::get_num_threads());
  EXPECT_EQ(resolve_cpu_workers(4, c10::Device("cuda"), false), 1);
  EXPECT_THROW(resolve_cpu_workers(-1, c10::Device("cpu"), false), Error);
  EXPECT_THROW(resolve_cpu_workers(2, c10::Device("cpu"), true), Error);
}
