// Activation checkpointing per DiT block: the forward pass keeps only a block's inputs, and the
// backward pass runs the block again with gradients on to get its activations back. It trades
// about one more forward pass (a third more compute) for the activation memory of every block,
// which is what fits the unmasked stages at batch 256 on one 80 GB GPU (docs/performance.md).
// train.activation_checkpointing / bench --checkpoint-activations switch it on.
#pragma once
#include "model/block.h"

namespace microdit {

// block.forward(x, caption, c) (same values), recomputed in the backward pass. The block's
// parameters are inputs of the recorded node, so their gradients reach .grad (or
// torch::autograd::grad) the ordinary way; the bf16 autocast state of the forward pass is
// restored for the recomputation. Blocks hold no randomness, so the recomputation is exact.
Tensor recompute_block(DiTBlockImpl& block, const Tensor& x, const CaptionKV& caption, const Tensor& c);

}  // namespace microdit
