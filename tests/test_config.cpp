#include <gtest/gtest.h>
#include <torch/torch.h>
#include <yaml-cpp/yaml.h>

#include "core/choice.h"
#include "core/error.h"
#include "model/config.h"
#include "model/microdit.h"
#include "model/stats.h"

#include "test_util.h"

using namespace microdit;
using microdit::test_util::error_of;

TEST(Config, PublishedParameterCounts) {
  EXPECT_EQ(model_stats(preset("MicroDiT_XL_2"), 0.75, 77).params, 1165442320);
  EXPECT_EQ(model_stats(preset("MicroDiT_Tiny_2"), 0.75, 77).params, 200692752);
}

TEST(Config, AnalyticCountMatchesTheBuiltModel) {
  for (const std::string name : {"MicroDiT_Pico_2", "MicroDiT_Nano_2"}) {
    for (bool bias : {false, true}) {
      auto c = preset(name);
      c.use_bias = bias;
      c.input_size = 16;
      MicroDiT m(c);
      int64_t n = 0;
      for (const auto& p : m->parameters()) n += p.numel();
      EXPECT_EQ(model_stats(c, 0.5, 7).params, n) << name << " bias=" << bias;
    }
  }
}

TEST(Config, MaskingCutsBackboneFlops) {
  auto c = preset("MicroDiT_XL_2");
  auto masked = model_stats(c, 0.75, 77), dense = model_stats(c, 0.0, 77);
  EXPECT_EQ(masked.kept_tokens, 64);
  EXPECT_GT(dense.train_flops / masked.train_flops, 2.5);
  EXPECT_LT(masked.active_params, masked.params);
}

TEST(Config, LinspaceMatchesNumpy) {
  auto v = linspace(0.5, 4.0, 28);
  EXPECT_EQ(v.front(), 0.5);
  EXPECT_EQ(v.back(), 4.0);
  EXPECT_DOUBLE_EQ(v[1], 0.5 + 3.5 / 27);
}

TEST(Config, BadShapesAreRefusedWithAClearMessage) {
  auto c = preset("MicroDiT_Tiny_2");
  c.input_size = 33;
  EXPECT_NE(error_of([&] { c.validate(); }).find("not divisible by patch_size"), std::string::npos);
  c = preset("MicroDiT_Tiny_2");
  c.dim = 500;
  EXPECT_NE(error_of([&] { MicroDiT m(c); }).find("dim 500 is not divisible by head_dim 32"),
            std::string::npos);
  c = preset("MicroDiT_Tiny_2");
  c.expert_capacity = 9;
  EXPECT_NE(error_of([&] { c.validate(); }).find("expert_capacity"), std::string::npos);
}

TEST(Config, ModelRefusesWrongInputShapes) {
  auto c = preset("MicroDiT_Pico_2");
  c.input_size = 8;
  c.caption_channels = 16;
  MicroDiT m(c);
  auto t = torch::zeros({2});
  auto y = torch::zeros({2, 1, 5, 16});
  EXPECT_NE(error_of([&] { m->forward(torch::zeros({2, 4, 9, 9}), t, y); }).find("model input must be"),
            std::string::npos);
  EXPECT_NE(error_of([&] { m->forward(torch::zeros({2, 4, 8, 8}), t, torch::zeros({2, 1, 5, 8})); })
                .find("caption must be"),
            std::string::npos);
}

TEST(Config, YamlReadsPresetAndOverridesAndRefusesUnknownKeys) {
  auto c = config_from_yaml(YAML::Load("preset: MicroDiT_Tiny_2\ninput_size: 64\npos_interp_scale: 2"));
  EXPECT_EQ(c.dim, 512);
  EXPECT_EQ(c.input_size, 64);
  EXPECT_EQ(c.pos_interp_scale, 2.0);
  EXPECT_NE(error_of([] { config_from_yaml(YAML::Load("dimm: 3")); }).find("unknown key 'dimm'"),
            std::string::npos);
  EXPECT_NE(error_of([] { config_from_yaml(YAML::Load("dim: wide")); }).find("'dim' must be an integer"),
            std::string::npos);
  // Round trip through YAML.
  auto again = config_from_yaml(YAML::Load(config_to_yaml(c)));
  EXPECT_EQ(again.depth, c.depth);
  EXPECT_EQ(again.mlp_ratio, c.mlp_ratio);
}

TEST(Config, ChoiceTakesAListedNameAndNamesThemAllOtherwise) {
  enum class Mode { a, b, c };
  EXPECT_EQ(parse_choice<Mode>("--mode", "b", {{"a", Mode::a}, {"b", Mode::b}, {"c", Mode::c}}), Mode::b);
  EXPECT_EQ(error_of([] { parse_choice<Mode>("--mode", "B", {{"a", Mode::a}, {"b", Mode::b}, {"c", Mode::c}}); }),
            "--mode: expected a, b or c, got 'B'");
  EXPECT_EQ(error_of([] { parse_choice<Mode>("--mode", "", {{"a", Mode::a}, {"b", Mode::b}}); }),
            "--mode: expected a or b, got ''");
  EXPECT_EQ(error_of([] { parse_choice<Mode>("--mode", "x", {{"a", Mode::a}}); }), "--mode: expected a, got 'x'");
}
