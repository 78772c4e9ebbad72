#include <gtest/gtest.h>

#include "core/fs.h"
#include "data/emoji.h"
#include "eval/colour.h"

using namespace microdit;

TEST(Colour, HueOfFlatColours) {
  Image red(8, 8, Rgb{220, 20, 30}), white(8, 8), half(8, 8);
  EXPECT_NEAR(*dominant_hue(red), 357, 6);
  EXPECT_FALSE(dominant_hue(white).has_value());
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 8; ++x) {
      auto* p = half.at(x, y);
      p[0] = 30, p[1] = 60, p[2] = 220;  // blue on white
    }
  EXPECT_NEAR(*dominant_hue(half), 230, 8);
  EXPECT_EQ(nearest_probe(std::nullopt, heart_probes()), -1);
}

// The classifier must recognise every probe heart as rendered in the training set.
TEST(Colour, RenderedProbeHeartsClassifyAsThemselves) {
  if (!is_regular_file(kEmojiFontPath)) GTEST_SKIP() << kEmojiFontPath << " missing: apt-get install fonts-noto-color-emoji";
  EmojiRenderer r;
  const auto& probes = heart_probes();
  const std::vector<std::string> seqs = {"\u2764\ufe0f", "\U0001F49B", "\U0001F49A", "\U0001F499",
                                         "\U0001F49C"};  // red, yellow, green, blue, purple
  ASSERT_EQ(seqs.size(), probes.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    auto out = r.render(seqs[i], 32);
    ASSERT_TRUE(out.ok()) << out.failure;
    auto hue = dominant_hue(out.image);
    ASSERT_TRUE(hue.has_value()) << probes[i].prompt;
    EXPECT_EQ(nearest_probe(hue, probes), static_cast<int>(i)) << probes[i].prompt << " hue " << *hue;
  }
}
