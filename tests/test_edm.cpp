#include <gtest/gtest.h>
#include <torch/torch.h>

#include "diffusion/edm.h"

#include "test_util.h"

using namespace microdit;

namespace {
ModelConfig tiny() { return test_util::tiny_config(); }
}  // namespace

TEST(EDM, SigmaScheduleEndpoints) {
  EDMConfig edm;
  auto t = sampler_sigmas(18, edm);
  ASSERT_EQ(t.size(), 19u);
  EXPECT_NEAR(t.front(), 80.0, 1e-9);
  EXPECT_NEAR(t[17], 0.002, 1e-12);
  EXPECT_EQ(t.back(), 0.0);
  for (size_t i = 1; i < t.size(); ++i) EXPECT_LT(t[i], t[i - 1]);
}

TEST(EDM, SamplerIsDeterministicAndEulerDiffersFromHeun) {
  torch::manual_seed(1);
  MicroDiT m(tiny());
  // Non-zero output layers so the network actually contributes.
  for (auto& p : m->parameters()) p.data().normal_(0, 0.05);
  auto z = torch::randn({2, 4, 8, 8});
  auto y = torch::randn({2, 1, 3, 16});
  SamplerOptions heun;
  heun.steps = 3, heun.cfg = 2.0;
  EDMConfig edm;
  auto a = edm_sample(*m, z, y, edm, heun), b = edm_sample(*m, z, y, edm, heun);
  EXPECT_TRUE(torch::equal(a, b));
  auto euler = heun;
  euler.solver = Solver::Euler;
  EXPECT_GT((edm_sample(*m, z, y, edm, euler) - a).abs().max().item<float>(), 1e-4);
  EXPECT_THROW(parse_solver("rk4"), std::runtime_error);
}

TEST(EDM, MaskedLossOnlyCountsKeptTokens) {
  torch::manual_seed(2);
  MicroDiT m(tiny());
  for (auto& p : m->parameters()) p.data().normal_(0, 0.05);
  auto x = torch::randn({2, 4, 8, 8});
  auto y = torch::randn({2, 1, 3, 16});
  auto draws = draw_loss_randomness(x, 0.75, 2);
  ASSERT_TRUE(draws.mask.has_value());
  EXPECT_EQ(draws.mask->ids_keep.size(1), 4);  // int(16 * 0.25)
  EDMConfig edm;
  auto masked = edm_loss(*m, x, y, draws, edm);
  // Changing the mask token (which fills only removed tokens) must not change the loss.
  m->mask_token.fill_(123.0);
  EXPECT_NEAR(edm_loss(*m, x, y, draws, edm).item<double>(), masked.item<double>(), 1e-6);
}

TEST(EDM, StageChangeRebuildsPositionsAtNewResolution) {
  auto c = tiny();
  MicroDiT m(c);
  m->set_resolution(16, 2.0);
  EXPECT_EQ(m->pos_embed.sizes(), (std::vector<int64_t>{1, 64, c.dim}));
  // Scale 2 at twice the grid covers the same coordinate range: the first row's
  // column coordinates are 0, 0.5, 1, ... so every other entry equals the old table's.
  auto old_table = sincos_pos_embed_2d(c.dim, 4, 4, 1.0);
  auto row0 = m->pos_embed[0].narrow(0, 0, 8).index({torch::indexing::Slice(0, 8, 2)});
  EXPECT_TRUE(torch::allclose(row0.narrow(1, 0, c.dim / 2), old_table.narrow(0, 0, 4).narrow(1, 0, c.dim / 2), 1e-6, 1e-6));
  auto out = m->forward(torch::randn({1, 4, 16, 16}), torch::zeros({1}), torch::randn({1, 1, 3, 16}));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{1, 4, 16, 16}));
}
