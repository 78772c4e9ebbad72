#include <gtest/gtest.h>
#include <torch/torch.h>

#include "model/masking.h"

using namespace microdit;

TEST(Masking, MaskThenUnmaskRestoresOrder) {
  torch::manual_seed(0);
  const int64_t B = 3, T = 16, e = 5, K = 4;
  auto x = torch::randn({B, T, e});
  auto m = mask_from_noise(torch::rand({B, T}), K);
  auto kept = mask_out_tokens(x, m.ids_keep);  // (B, K, e)
  ASSERT_EQ(kept.sizes(), (std::vector<int64_t>{B, K, e}));
  auto token = torch::full({1, 1, e}, -7.0);
  auto back = unmask_tokens(kept, m.ids_restore, token);  // (B, T, e)
  // Kept tokens are back at their original positions, removed ones hold the mask token.
  auto keep = (1 - m.mask).to(torch::kBool).unsqueeze(-1).expand({B, T, e});
  EXPECT_TRUE(torch::equal(back.masked_select(keep), x.masked_select(keep)));
  EXPECT_TRUE(back.masked_select(~keep).eq(-7.0).all().item<bool>());
  EXPECT_EQ(m.mask.sum().item<double>(), B * (T - K));
}

TEST(Masking, NoiseOrderDecidesWhoIsKept) {
  // The smallest noise values are kept, in ascending order of noise.
  auto noise = torch::tensor({{0.9f, 0.1f, 0.5f, 0.3f}});
  auto m = mask_from_noise(noise, 2);
  EXPECT_TRUE(torch::equal(m.ids_keep, torch::tensor({{1, 3}}, torch::kLong)));
  EXPECT_TRUE(torch::equal(m.mask, torch::tensor({{1.f, 0.f, 1.f, 0.f}})));
}

TEST(Masking, RefusesKeepingNothing) {
  EXPECT_THROW(mask_from_noise(torch::rand({1, 4}), 0), std::runtime_error);
  EXPECT_THROW(random_mask(1, 4, 1.0, torch::kCPU), std::runtime_error);
}
