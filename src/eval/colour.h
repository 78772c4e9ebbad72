// Evidence that text conditioning works: samples for prompts that differ only in a colour
// word must show that colour. The dominant hue of a sample is the peak of a saturation-
// weighted hue histogram over its non-background (non-white, non-grey) pixels.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "data/image.h"

namespace microdit {

struct ColourProbe {
  std::string name;    // the emoji's name, "red heart"
  std::string colour;  // its colour word (data/colour_words.h), "red"
  double hue;          // degrees in [0, 360): the colour's hue in the rendered emoji
  // The probe's caption as `dataset emoji` writes it (with or without the colour word):
  // "red heart, smileys & emotion, heart, mostly red".
  std::string prompt(bool colour_words = true) const;
};

// Hearts whose hues are far apart: red, yellow, green, blue, purple.
const std::vector<ColourProbe>& heart_probes();

// Dominant hue in degrees, or nullopt when the image has (almost) no coloured pixels.
std::optional<double> dominant_hue(const Image& image);

// Index of the probe whose hue is nearest (circular distance), or -1 for no colour.
int nearest_probe(std::optional<double> hue, const std::vector<ColourProbe>& probes);

}  // namespace microdit
