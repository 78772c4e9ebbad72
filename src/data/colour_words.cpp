#include "data/colour_words.h"

#include <algorithm>
#include <array>
#include <cmath>

namespace microdit {

Hsv to_hsv(const uint8_t* rgb) {
  const double r = rgb[0] / 255.0, g = rgb[1] / 255.0, b = rgb[2] / 255.0;
  const double mx = std::max({r, g, b}), mn = std::min({r, g, b}), d = mx - mn;
  Hsv c;
  c.v = mx;
  c.s = mx > 0 ? d / mx : 0;
  if (d <= 0) return c;
  double h = 0;
  if (mx == r) h = std::fmod((g - b) / d, 6.0);
  else if (mx == g) h = (b - r) / d + 2;
  else h = (r - g) / d + 4;
  c.h = std::fmod(h * 60 + 360, 360);
  return c;
}

namespace {
constexpr std::array<const char*, 11> kWords = {"red",    "orange", "yellow", "green", "blue", "purple",
                                                "pink",   "brown",  "black",  "grey",  "white"};
bool is_background(const Hsv& c) { return c.v > 0.9 && c.s < 0.12; }

// Index into kWords.
int colour_index(const Hsv& c) {
  if (!is_chromatic(c)) return c.v < 0.3 ? 8 : c.v < 0.85 ? 9 : 10;  // black, grey, white
  // Hue sectors in degrees, placed between the hues of Noto's emoji: red heart 0-10 and red
  // apple 10-20 are red, orange heart 30-40 orange, yellow heart and faces 40-50 yellow,
  // frog 60-70 and green heart 80-90 green, pink heart 335 pink. Dark oranges and yellows
  // (hue 10-60, value < 0.75: brown heart, wood, darker skin tones) read as brown.
  if (c.h >= 10 && c.h < 60 && c.v < 0.75) return 7;
  if (c.h < 20 || c.h >= 345) return 0;
  if (c.h < 40) return 1;
  if (c.h < 60) return 2;
  if (c.h < 165) return 3;
  if (c.h < 255) return 4;
  if (c.h < 300) return 5;
  return 6;
}
}  // namespace

std::string dominant_colour_word(const Image& image) {
  std::array<int, kWords.size()> count{};
  for (int y = 0; y < image.height; ++y)
    for (int x = 0; x < image.width; ++x) {
      const Hsv c = to_hsv(image.at(x, y));
      if (is_background(c)) continue;
      ++count[colour_index(c)];
    }
  const auto best = std::max_element(count.begin(), count.end());
  return *best == 0 ? "white" : kWords[best - count.begin()];
}

}  // namespace microdit
