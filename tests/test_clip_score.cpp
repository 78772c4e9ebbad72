// CLIP score: open_clip's image tower, text projection and the score against open_clip on
// random weights of a small ViT (fixture generated at test time by
// tools/make_clip_image_fixtures.py in the project venv; skipped without open_clip), and the
// ViT-H/14 image tower's shape against open_clip's (632,076,800 parameters in 392 tensors).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>

#include "core/fs.h"
#include "data/image_io.h"
#include "eval/clip_image.h"
#include "io/checkpoint.h"
#include "test_util.h"
#include "text/encoder.h"

using namespace microdit;

namespace {

double rel(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm()).item<double>();
}

int64_t numel(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

// Builds the fixture in the build folder on first use; "" when open_clip is missing.
std::string fixture() {
  const std::string py = std::string(microdit::test_util::source_dir()) + "/.venv/bin/python";
  const std::string dir = test_util::build_dir() + "/clip_score_fixture";
  if (is_regular_file(dir + "/clip_expected.safetensors")) return dir;
  if (!is_regular_file(py) || std::system((py + " -c 'import open_clip' 2>/dev/null").c_str()) != 0) return "";
  const std::string cmd = py + " " + microdit::test_util::source_dir() + "/tools/make_clip_image_fixtures.py " + dir + " >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0 ? dir : "";
}

}  // namespace

TEST(ClipScore, MatchesOpenClipOnRandomWeights) {
  const auto dir = fixture();
  if (dir.empty()) GTEST_SKIP() << "open_clip is not installed in the project venv";
  const auto ref = read_safetensors(dir + "/clip_expected.safetensors");
  ClipScorer clip(dir + "/clip_small.safetensors");
  EXPECT_EQ(clip.vision_->config.image_size, 56);
  EXPECT_EQ(clip.vision_->config.heads, 2);
  EXPECT_EQ(clip.vision_->config.output_dim, 32);
  const auto fi = clip.image_features(ref.at("pixels"));
  const auto ft = clip.text_features(ref.at("ids"));
  EXPECT_LT(rel(fi, ref.at("image_features")), 1e-5);
  EXPECT_LT(rel(ft, ref.at("text_features")), 1e-5);
  const auto s = clip_scores(fi, ft);
  EXPECT_LT((s - ref.at("scores").to(at::kDouble)).abs().max().item<double>(), 1e-3);
  // torchmetrics: the mean, clipped at 0.
  EXPECT_NEAR(clip_score(s), std::max(0.0, ref.at("scores").to(at::kDouble).mean().item<double>()), 1e-3);
  EXPECT_EQ(clip_score(torch::tensor({-5.0, -1.0})), 0.0);
  // open_clip's preprocessing (PIL bicubic resize, centre crop, OpenAI mean/std).
  const auto pre = clip_preprocess(decode_image_file(dir + "/clip_img.png"), 56);
  EXPECT_LT((pre - ref.at("preprocessed")).abs().max().item<double>(), 1e-5);
  // Our tokenizer gives open_clip's ids when the BPE vocabulary asset is installed.
  if (is_regular_file(text::clip_bpe_path())) {
    EXPECT_TRUE(torch::equal(clip.tokenize({"a photo of a red heart", "two cats on a sofa",
                                            "an emoji of a smiling face"}),
                             ref.at("ids").to(at::kLong)));
  }
}

TEST(ClipScore, VitH14ImageTowerShape) {
  // open_clip ViT-H-14 visual: 632,076,800 parameters in 392 tensors (make_clip_image_fixtures.py
  // --vit-h). Two towers of 1 and 2 blocks give the per-block count without allocating 2.5 GB.
  auto c = clip_vit_h_14_vision();
  EXPECT_EQ(c.width / c.heads, 80);
  c.layers = 1;
  ClipVisionModel one(c);
  c.layers = 2;
  ClipVisionModel two(c);
  const int64_t per_block = numel(*two) - numel(*one);
  EXPECT_EQ(numel(*one) + 31 * per_block, 632076800);
  EXPECT_EQ(int64_t(one->named_parameters().size()) + 31 * 12, 392);
  // Names as open_clip's, and the shape read back from them.
  auto sd = state_dict(*two);
  const auto back = clip_vision_config_from_tensors(sd);
  EXPECT_EQ(back.image_size, 224);
  EXPECT_EQ(back.patch_size, 14);
  EXPECT_EQ(back.heads, 16);
  EXPECT_EQ(back.output_dim, 1024);
  EXPECT_EQ(back.layers, 2);
  NamedTensors prefixed;
  for (const auto& [k, t] : sd) prefixed.emplace_back("visual." + k, t);
  prefixed.emplace_back("logit_scale", torch::ones({}));
  EXPECT_EQ(clip_vision_state_dict(prefixed).size(), sd.size());
}

TEST(ClipScore, RejectsNonClipWeights) {
  const auto err = test_util::error_of(
      [] { ClipScorer(std::string(microdit::test_util::source_dir()) + "/tests/data/fid_stats_a.npz"); });
  EXPECT_FALSE(err.empty());
  const auto err2 = test_util::error_of(
      [] { ClipScorer(std::string(microdit::test_util::source_dir()) + "/tests/data/text_misshaped_clip.safetensors"); });
  EXPECT_NE(err2.find("no image tower"), std::string::npos) << err2;
}
