// Colour words for captions. An emoji's name rarely says its colour ("grinning face" is
// yellow, "frog" is green), so a caption model cannot learn what "yellow" looks like from
// the three emoji whose names contain it. `dataset emoji` therefore appends the name of each
// image's dominant colour to its caption ("..., mostly yellow"), the way the paper's
// synthetic captions describe what is in the picture (docs/dataset.md).
#pragma once
#include <cstdint>
#include <string>

#include "data/image.h"

namespace microdit {

struct Hsv {
  double h = 0;  // hue in degrees, [0, 360); 0 for greys
  double s = 0;  // saturation (max - min) / max, [0, 1]
  double v = 0;  // value max(r, g, b), [0, 1]
};
Hsv to_hsv(const uint8_t* rgb);

// Saturated and bright enough to have a hue worth naming (else black, grey or white). The
// colour check's dominant_hue() uses the same test.
inline bool is_chromatic(const Hsv& c) { return c.s >= 0.25 && c.v >= 0.15; }

// The most frequent colour word (red, orange, yellow, green, blue, purple, pink, brown, black,
// grey, white) over the pixels that are not background (near-white and unsaturated); "white"
// when every pixel is background.
std::string dominant_colour_word(const Image& image);

}  // namespace microdit
