#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>

#include "eval/recall.h"
#include "eval/summary.h"
#include "test_util.h"

using namespace microdit;
using namespace microdit::test_util;

TEST(Recall, SpreadIndicesCoverTheRangeInOrder) {
  EXPECT_EQ(spread_indices(10, 5), (std::vector<int>{0, 2, 4, 6, 8}));
  EXPECT_EQ(spread_indices(3, 8), (std::vector<int>{0, 1, 2}));  // never more than exist
  EXPECT_TRUE(spread_indices(0, 4).empty());
  const auto v = spread_indices(1790, 64);
  ASSERT_EQ(v.size(), 64u);
  EXPECT_GT(v.back(), 1700);  // reaches the end of the file (the flags)
}

TEST(Recall, NearestImagesRanksByPixelDistance) {
  auto train = at::zeros({4, 3, 2, 2});
  train[1].fill_(1.0);
  train[2].fill_(-1.0);
  train[3].fill_(0.4);
  auto samples = at::stack({train[2] + 0.01, at::full({3, 2, 2}, 0.8)});  // near 2; between 3 and 1
  const auto nn = nearest_images(samples, train, 5);
  ASSERT_EQ(nn.sizes(), (at::IntArrayRef{2, 4}));  // k is capped at the training set's size
  EXPECT_EQ(nn[0][0].item<int64_t>(), 2);
  EXPECT_EQ(nn[0][1].item<int64_t>(), 0);
  EXPECT_EQ(nn[1][0].item<int64_t>(), 1);  // |0.8-1| < |0.8-0.4|
  EXPECT_EQ(nn[1][1].item<int64_t>(), 3);
  EXPECT_EQ(nn[1][3].item<int64_t>(), 2);
  EXPECT_NE(error_of([&] { nearest_images(samples, at::zeros({4, 3, 4, 4}), 1); }).find("differ in shape"),
            std::string::npos);
}

TEST(Recall, ReadsEmojiRowsAndRejectsOtherCaptionFiles) {
  TempDir dir;
  {
    std::ofstream f(dir.path + "/captions.jsonl");
    f << R"({"file":"images/00000.png","caption":"red heart, smileys & emotion, heart","name":"red heart","subgroup":"heart","split":"train"})"
      << "\n\n"
      << R"({"file":"images/00001.png","caption":"frog","subgroup":"animal-amphibian","split":"val"})" << "\n";
  }
  const auto rows = read_emoji_rows(dir.path);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].subgroup, "heart");
  EXPECT_EQ(rows[1].split, "val");
  {
    std::ofstream f(dir.path + "/captions.jsonl");
    f << R"({"file":"a.png","caption":"a cat"})" << "\n";  // a latent-prepare caption file
  }
  EXPECT_NE(error_of([&] { read_emoji_rows(dir.path); }).find(":1: expected a JSON object with file, caption and subgroup"),
            std::string::npos);
  EXPECT_NE(error_of([&] { read_emoji_rows(dir.path + "/nope"); }).find("no such file"), std::string::npos);
}

TEST(Recall, SummaryKeepsOtherKeysAndRefusesNonObjects) {
  TempDir dir;
  const std::string path = dir.path + "/summary.json";
  update_summary(path, "colour", {{"accuracy", 1.0}});
  update_summary(path, "recall", {{"top5", 0.5}});
  update_summary(path, "recall", {{"top5", 0.75}});
  const auto j = nlohmann::json::parse(read_file_bytes(path));
  EXPECT_EQ(j["colour"]["accuracy"].get<double>(), 1.0);
  EXPECT_EQ(j["recall"]["top5"].get<double>(), 0.75);
  { std::ofstream(path) << "[1, 2]"; }
  EXPECT_NE(error_of([&] { update_summary(path, "recall", {}); }).find("not a JSON object"), std::string::npos);
  EXPECT_EQ(read_file_bytes(path), "[1, 2]");  // never overwritten
}
