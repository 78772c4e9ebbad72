// Does the model draw the emoji a caption names, or only its colour? For fixed captions of an
// emoji dataset (`microdit dataset emoji`), one sample per caption is compared with every
// training image in pixel space: recall counts how often the nearest training image is the
// captioned emoji itself (top-1), is among the 5 nearest (top-5), or is at least from the
// caption's Unicode subgroup ("face-smiling", "animal-amphibian", "country-flag"). Captions of
// the held-out split have no training image of their own, so only their subgroup is scored.
#pragma once
#include <string>
#include <vector>

#include "data/emoji.h"
#include "data/image.h"

namespace microdit {

// n indices spread evenly over [0, count) (all of them when n >= count): a fixed choice that
// covers every part of the file's order (and so every group), independent of any seed.
std::vector<int> spread_indices(int count, int n);

// For each sample (N, 3, H, W) in [-1, 1], the k training images (M, 3, H, W) nearest in L2
// pixel distance, nearest first: (N, k) int64.
at::Tensor nearest_images(const at::Tensor& samples, const at::Tensor& train, int k);

struct RecallScore {
  int n = 0, top1 = 0, top5 = 0, subgroup = 0;
  double pct(int v) const { return n ? 100.0 * v / n : 0.0; }
};

}  // namespace microdit
