// Analytic size and cost of a MicroDiT configuration (no weights allocated), so
// `microdit info` answers instantly even for the 1.16 B-parameter preset.
#pragma once
#include <cstdint>

#include "model/config.h"

namespace microdit {

struct ModelStats {
  int64_t params = 0;          // every learnable tensor (buffers excluded)
  int64_t moe_expert_params = 0;  // expert weights w1, w2 of all MoE layers
  double active_params = 0;    // per token: experts counted at capacity/E of their weight
  double forward_flops = 0;    // per image, 2 FLOPs per multiply-add, attention included
  double train_flops = 0;      // per image: forward + backward = 3 x forward
  int tokens = 0, kept_tokens = 0;
};

// caption_len: L tokens of caption (77 for CLIP); mask_ratio: tokens dropped after the mixer.
ModelStats model_stats(const ModelConfig& c, double mask_ratio, int caption_len);

}  // namespace microdit
