#include <gtest/gtest.h>

#include "core/fs.h"
#include "data/colour_words.h"
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
    ASSERT_TRUE(hue.has_value()) << probes[i].name;
    EXPECT_EQ(nearest_probe(hue, probes), static_cast<int>(i)) << probes[i].name << " hue " << *hue;
    // The check's prompt is the heart's training caption, colour word included.
    EXPECT_EQ(dominant_colour_word(out.image), probes[i].colour) << probes[i].name;
  }
}

TEST(Colour, ProbePromptsAreTheDatasetCaptions) {
  const auto& p = heart_probes()[1];
  EXPECT_EQ(p.prompt(), "yellow heart, smileys & emotion, heart, mostly yellow");
  EXPECT_EQ(p.prompt(false), "yellow heart, smileys & emotion, heart");
}

TEST(ColourWords, NamesFlatColoursAndIgnoresTheWhiteBackground) {
  auto word = [](Rgb c) {
    Image im(8, 8);  // white background with a 4 x 4 square of c
    for (int y = 2; y < 6; ++y)
      for (int x = 2; x < 6; ++x) std::copy(c.begin(), c.end(), im.at(x, y));
    return dominant_colour_word(im);
  };
  EXPECT_EQ(word({220, 20, 30}), "red");
  EXPECT_EQ(word({250, 150, 20}), "orange");
  EXPECT_EQ(word({250, 210, 40}), "yellow");
  EXPECT_EQ(word({40, 180, 60}), "green");
  EXPECT_EQ(word({30, 90, 220}), "blue");
  EXPECT_EQ(word({140, 60, 200}), "purple");
  EXPECT_EQ(word({240, 80, 180}), "pink");
  EXPECT_EQ(word({120, 70, 20}), "brown");
  EXPECT_EQ(word({20, 20, 20}), "black");
  EXPECT_EQ(word({128, 128, 128}), "grey");
  EXPECT_EQ(dominant_colour_word(Image(8, 8)), "white");  // background only
  const Hsv c = to_hsv(Rgb{0, 0, 255}.data());
  EXPECT_NEAR(c.h, 240, 1e-9);
  EXPECT_NEAR(c.s, 1, 1e-9);
  EXPECT_NEAR(c.v, 1, 1e-9);
}
