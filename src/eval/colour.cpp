#include "eval/colour.h"

#include "data/colour_words.h"
#include "data/emoji.h"

#include <algorithm>
#include <array>
#include <cmath>

namespace microdit {

const std::vector<ColourProbe>& heart_probes() {
  // Hues of the Noto Color Emoji hearts as rendered at 32 px, measured with dominant_hue()
  // (tests/test_colour.cpp checks them). Orange (35) and pink (335) sit within 30 degrees of
  // yellow and red, too close to tell apart in a blurry 32 px sample, so they are left out.
  static const std::vector<ColourProbe> probes = {
      {"red heart", "red", 5},
      {"yellow heart", "yellow", 45},
      {"green heart", "green", 86},
      {"blue heart", "blue", 207},
      {"purple heart", "purple", 293}};
  return probes;
}

std::string ColourProbe::prompt(bool colour_words) const {
  EmojiEntry e;
  e.name = name;
  e.group = "Smileys & Emotion";
  e.subgroup = "heart";
  return emoji_caption(e, colour_words ? colour : "");
}

std::optional<double> dominant_hue(const Image& image) {
  constexpr int kBins = 36;  // 10 degrees each
  std::array<double, kBins> hist{};
  double weight = 0;
  for (int y = 0; y < image.height; ++y)
    for (int x = 0; x < image.width; ++x) {
      const Hsv c = to_hsv(image.at(x, y));
      if (!is_chromatic(c)) continue;  // white background, greys, near-black
      hist[static_cast<int>(c.h / (360.0 / kBins)) % kBins] += c.s;
      weight += c.s;
    }
  if (weight < 3) return std::nullopt;  // fewer than a few coloured pixels
  // Peak of the histogram smoothed over neighbouring bins, refined by a weighted mean.
  int best = 0;
  double best_v = -1;
  for (int i = 0; i < kBins; ++i) {
    const double v = hist[(i + kBins - 1) % kBins] + hist[i] + hist[(i + 1) % kBins];
    if (v > best_v) best_v = v, best = i;
  }
  double sx = 0, sy = 0;
  for (int k = -1; k <= 1; ++k) {
    const int i = (best + k + kBins) % kBins;
    const double a = (i + 0.5) * (2 * M_PI / kBins);
    sx += hist[i] * std::cos(a);
    sy += hist[i] * std::sin(a);
  }
  return std::fmod(std::atan2(sy, sx) * 180 / M_PI + 360, 360);
}

int nearest_probe(std::optional<double> hue, const std::vector<ColourProbe>& probes) {
  if (!hue) return -1;
  int best = -1;
  double best_d = 1e9;
  for (size_t i = 0; i < probes.size(); ++i) {
    double d = std::fabs(*hue - probes[i].hue);
    d = std::min(d, 360 - d);
    if (d < best_d) best_d = d, best = static_cast<int>(i);
  }
  return best;
}

}  // namespace microdit
