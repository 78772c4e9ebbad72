// Bounds on what one sampling call may ask for, shared by `microdit sample` and `microdit
// serve`: a value outside them is a one-line error naming it (no NaN guidance, no unbounded
// image counts, no seed that a browser cannot hold exactly).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"

namespace microdit {

struct SamplingLimits {
  static constexpr int64_t kMaxImagesPerPrompt = 64;   // --n
  static constexpr int64_t kMaxImages = 1024;          // prompts x --n
  static constexpr int64_t kMaxPrompts = 1024;
  static constexpr int64_t kMaxSteps = 1000;           // sampler steps
  static constexpr double kMaxCfg = 100.0;             // guidance in [0, 100]; 1: off
  static constexpr uint64_t kMaxSeed = (uint64_t{1} << 53) - 1;  // exact in JSON / JavaScript
  static constexpr size_t kMaxPromptBytes = 2000;      // (tokenizers truncate long before)
  static constexpr int64_t kMaxScale = 32;             // grid enlargement
};

// Throws microdit::Error naming the first value out of range.
inline void check_sampling_values(int64_t per_prompt, int64_t steps, double cfg, uint64_t seed) {
  using L = SamplingLimits;
  MD_CHECK(per_prompt >= 1 && per_prompt <= L::kMaxImagesPerPrompt,
           "the number of images per prompt must be in [1, {}], got {}", L::kMaxImagesPerPrompt, per_prompt);
  MD_CHECK(steps >= 1 && steps <= L::kMaxSteps, "steps must be in [1, {}], got {}", L::kMaxSteps, steps);
  MD_CHECK(std::isfinite(cfg) && cfg >= 0 && cfg <= L::kMaxCfg,
           "guidance (cfg) must be a number in [0, {}], got {}", L::kMaxCfg, cfg);
  MD_CHECK(seed <= L::kMaxSeed, "the seed must be in [0, {}], got {}", L::kMaxSeed, seed);
}

inline void check_prompts(const std::vector<std::string>& prompts, int64_t per_prompt) {
  using L = SamplingLimits;
  MD_CHECK(static_cast<int64_t>(prompts.size()) <= L::kMaxPrompts, "at most {} prompts, got {}",
           L::kMaxPrompts, prompts.size());
  for (const auto& p : prompts)
    MD_CHECK(p.size() <= L::kMaxPromptBytes, "a prompt may have at most {} bytes, got one of {}",
             L::kMaxPromptBytes, p.size());
  MD_CHECK(static_cast<int64_t>(prompts.size()) * per_prompt <= L::kMaxImages,
           "at most {} images per call ({} prompts x {} each asked)", L::kMaxImages, prompts.size(),
           per_prompt);
}

}  // namespace microdit
