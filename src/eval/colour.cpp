#include "eval/colour.h"

#include <algorithm>
#include <array>
#include <cmath>

namespace microdit {

const std::vector<ColourProbe>& heart_probes() {
  // Hues of the Noto Color Emoji hearts as rendered at 32 px, measured with dominant_hue()
  // (tests/test_colour.cpp checks them). Orange (35) and pink (335) sit within 30 degrees of
  // yellow and red, too close to tell apart in a blurry 32 px sample, so they are left out.
  static const std::vector<ColourProbe> probes = {
      {"red heart, smileys & emotion, heart", 5},
      {"yellow heart, smileys & emotion, heart", 45},
      {"green heart, smileys & emotion, heart", 86},
      {"blue heart, smileys & emotion, heart", 207},
      {"purple heart, smileys & emotion, heart", 293}};
  return probes;
}

std::optional<double> dominant_hue(const Image& image) {
  constexpr int kBins = 36;  // 10 degrees each
  std::array<double, kBins> hist{};
  double weight = 0;
  for (int y = 0; y < image.height; ++y)
    for (int x = 0; x < image.width; ++x) {
      const uint8_t* p = image.at(x, y);
      const double r = p[0] / 255.0, g = p[1] / 255.0, b = p[2] / 255.0;
      const double mx = std::max({r, g, b}), mn = std::min({r, g, b}), d = mx - mn;
      const double sat = mx > 0 ? d / mx : 0;
      if (sat < 0.25 || mx < 0.15) continue;  // white background, greys, near-black
      double h = 0;
      if (mx == r) h = std::fmod((g - b) / d, 6.0);
      else if (mx == g) h = (b - r) / d + 2;
      else h = (r - g) / d + 4;
      h = std::fmod(h * 60 + 360, 360);
      hist[static_cast<int>(h / (360.0 / kBins)) % kBins] += sat;
      weight += sat;
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
