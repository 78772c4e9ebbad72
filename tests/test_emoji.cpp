#include <gtest/gtest.h>

#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "data/emoji.h"

#include "test_util.h"

using namespace microdit;
using microdit::test_util::error_of;

namespace {

constexpr const char* kSample = R"(# emoji-test.txt
# Version: 15.0

# group: Smileys & Emotion

# subgroup: emotion
2764 FE0F                                              ; fully-qualified     # ❤️ E0.6 red heart
2764                                                   ; unqualified         # ❤ E0.6 red heart

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face

# group: People & Body

# subgroup: hand-fingers-closed
1F44D 1F3FD                                            ; fully-qualified     # 👍🏽 E1.0 thumbs up: medium skin tone

# subgroup: family
1F468 200D 1F469 200D 1F467 200D 1F466                 ; fully-qualified     # 👨‍👩‍👧‍👦 E2.0 family: man, woman, girl, boy
1F468 200D 2764 200D 1F468                             ; minimally-qualified # 👨‍❤‍👨 E2.0 couple with heart: man, man

# group: Component

# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: Symbols

# subgroup: keycap
0023 FE0F 20E3                                         ; fully-qualified     # #️⃣ E0.6 keycap: #

# group: Flags

# subgroup: country-flag
1F1E9 1F1EA                                            ; fully-qualified     # 🇩🇪 E0.6 flag: Germany

#EOF
)";

std::vector<EmojiEntry> sample() {
  std::istringstream in(kSample);
  return parse_emoji_test(in);
}

bool have_font() { return is_regular_file(kEmojiFontPath); }

// Share of non-white pixels whose red clearly dominates green and blue.
double red_share(const Image& im, int* non_white = nullptr) {
  int total = 0, red = 0;
  for (int i = 0; i < im.width * im.height; ++i) {
    const uint8_t* p = &im.pixels[i * 3];
    if (p[0] > 235 && p[1] > 235 && p[2] > 235) continue;
    ++total;
    red += p[0] > 140 && p[0] > p[1] + 60 && p[0] > p[2] + 60;
  }
  if (non_white) *non_white = total;
  return total ? static_cast<double>(red) / total : 0.0;
}

}  // namespace

TEST(EmojiTest, KeepsOnlyFullyQualifiedLines) {
  const auto e = sample();
  ASSERT_EQ(e.size(), 6u);  // unqualified, minimally-qualified and component lines are skipped
  EXPECT_EQ(e[0].name, "red heart");
  EXPECT_EQ(e[0].version, "E0.6");
  EXPECT_EQ(e[0].group, "Smileys & Emotion");
  EXPECT_EQ(e[0].subgroup, "emotion");
  EXPECT_EQ(e[0].codepoints, (std::vector<char32_t>{0x2764, 0xFE0F}));
  EXPECT_EQ(e[0].utf8(), "\u2764\uFE0F");
  EXPECT_EQ(e[0].codepoints_hex(), "2764 FE0F");
  EXPECT_EQ(e[1].subgroup, "face-smiling");
  EXPECT_EQ(e[2].name, "thumbs up: medium skin tone");
  EXPECT_EQ(e[2].group, "People & Body");
  EXPECT_EQ(e[3].name, "family: man, woman, girl, boy");
  EXPECT_EQ(e[3].codepoints.size(), 7u);
  EXPECT_EQ(e[4].name, "keycap: #");  // the '#' inside the emoji is not the comment mark
  EXPECT_EQ(e[4].codepoints, (std::vector<char32_t>{0x23, 0xFE0F, 0x20E3}));
  EXPECT_EQ(e[5].name, "flag: Germany");
  EXPECT_EQ(e[5].group, "Flags");
}

TEST(EmojiTest, CaptionsAndSplit) {
  const auto e = sample();
  EXPECT_EQ(emoji_caption(e[0]), "red heart, smileys & emotion, emotion");
  EXPECT_EQ(emoji_caption(e[1]), "grinning face, smileys & emotion, face smiling");
  EXPECT_EQ(emoji_caption(e[5]), "flag: Germany, flags, country flag");
  EXPECT_EQ(emoji_caption(e[0], "red"), "red heart, smileys & emotion, emotion, mostly red");
  EXPECT_EQ(emoji_split("red heart"), emoji_split("red heart"));
  int val = 0;
  for (int i = 0; i < 4000; ++i) val += emoji_split("emoji " + std::to_string(i)) == "val";
  EXPECT_GT(val, 4000 * 0.035);
  EXPECT_LT(val, 4000 * 0.065);
}

TEST(EmojiTest, MalformedInputIsAnErrorWithTheLine) {
  std::istringstream bad_cp("ZZZZ ; fully-qualified # x E0.6 bad\n");
  EXPECT_NE(error_of([&] { parse_emoji_test(bad_cp, "t.txt"); }).find("t.txt:1: bad code point 'ZZZZ'"),
            std::string::npos);
  std::istringstream no_hash("\n1F600 ; fully-qualified\n");
  EXPECT_NE(error_of([&] { parse_emoji_test(no_hash, "t.txt"); }).find("t.txt:2:"), std::string::npos);
  std::istringstream empty("# nothing here\n");
  EXPECT_NE(error_of([&] { parse_emoji_test(empty, "t.txt"); }).find("no fully-qualified emoji"),
            std::string::npos);
  EXPECT_NE(error_of([] { load_emoji_test("/nonexistent/emoji-test.txt"); }).find("unicode-data"),
            std::string::npos);
}

TEST(EmojiTest, TheInstalledFileParses) {
  if (!is_regular_file(kEmojiTestPath)) GTEST_SKIP() << kEmojiTestPath << " missing: apt-get install unicode-data";
  const auto all = load_emoji_test();
  EXPECT_GT(all.size(), 3000u);
  for (const auto& e : all) EXPECT_NE(e.group, "Component") << e.name;
}

TEST(EmojiRender, MissingFontNamesThePackage) {
  const std::string err = error_of([] { EmojiRenderer r("/nonexistent/NotoColorEmoji.ttf"); });
  EXPECT_NE(err.find("/nonexistent/NotoColorEmoji.ttf: no such file"), std::string::npos) << err;
  EXPECT_NE(err.find("fonts-noto-color-emoji"), std::string::npos) << err;
}

TEST(EmojiRender, RedHeartIsRed) {
  if (!have_font()) GTEST_SKIP() << kEmojiFontPath << " missing: apt-get install fonts-noto-color-emoji";
  const EmojiRenderer r;
  const auto heart = r.render("\u2764\uFE0F", 32);
  ASSERT_TRUE(heart.ok()) << heart.failure;
  EXPECT_EQ(heart.glyphs, 1);
  EXPECT_EQ(heart.image.width, 32);
  EXPECT_EQ(heart.image.height, 32);
  int non_white = 0;
  EXPECT_GT(red_share(heart.image, &non_white), 0.6);
  EXPECT_GT(non_white, 150);
  EXPECT_EQ(heart.image.at(0, 0)[0], 255);  // white background in the corner
  const auto blue = r.render("\U0001F499", 32);  // blue heart: not red
  ASSERT_TRUE(blue.ok()) << blue.failure;
  EXPECT_LT(red_share(blue.image), 0.1);
}

TEST(EmojiRender, SequencesAreOneGlyph) {
  if (!have_font()) GTEST_SKIP() << kEmojiFontPath << " missing: apt-get install fonts-noto-color-emoji";
  const EmojiRenderer r;
  for (const auto& e : sample()) {
    const auto out = r.render(e.utf8(), 24);
    EXPECT_TRUE(out.ok()) << e.name << ": " << out.failure;
    EXPECT_EQ(out.glyphs, 1) << e.name;
  }
  // Two emoji side by side are two glyphs: a failure, not a silent overlap.
  const auto two = r.render("\U0001F600\U0001F600", 24);
  EXPECT_FALSE(two.ok());
  EXPECT_EQ(two.glyphs, 2);
  EXPECT_FALSE(r.render("A", 24).ok());  // no colour glyph for a letter
}

TEST(EmojiRender, StrikeBitmapIsPremultipliedRgba) {
  if (!have_font()) GTEST_SKIP() << kEmojiFontPath << " missing: apt-get install fonts-noto-color-emoji";
  const EmojiRenderer r;
  std::string why;
  const RgbaImage im = r.render_rgba("\U0001F600", &why);
  ASSERT_TRUE(why.empty()) << why;
  EXPECT_TRUE(im.premultiplied);
  EXPECT_GE(im.width, r.strike_pixels());
  EXPECT_EQ(im.pixels.size(), static_cast<size_t>(im.width) * im.height * 4);
  for (size_t i = 0; i < im.pixels.size(); i += 4)
    ASSERT_LE(std::max({im.pixels[i], im.pixels[i + 1], im.pixels[i + 2]}), im.pixels[i + 3]);
}
