// Feed-forward layers: dense SwiGLU and expert-choice mixture-of-experts
// (reference: FeedForward, FeedForwardECMoe in dit.py).
#pragma once
#include "model/layers.h"

namespace microdit {

// w3(silu(w1 x) * w2 x), hidden n given already rounded.
struct FeedForwardImpl : torch::nn::Module {
  FeedForwardImpl(int64_t d, int64_t n, bool bias);
  Tensor forward(const Tensor& x);
  Linear w1{nullptr}, w2{nullptr}, w3{nullptr};
};
TORCH_MODULE(FeedForward);

// Expert choice: with T' tokens per sample, each of E experts picks its top
// k = int(capacity*T'/E) tokens by router probability softmax(x gate^T); a picked token gets
// P[t,e] * (gelu(x_t w1[e]) w2[e]) summed over the experts that picked it, others get 0.
struct FeedForwardECMoEImpl : torch::nn::Module {
  FeedForwardECMoEImpl(int64_t d, int64_t n, int64_t experts, double capacity);
  Tensor forward(const Tensor& x);  // (B, T', d) -> (B, T', d)
  int64_t experts;
  double capacity;
  Tensor w1, w2;                    // (E, d, n), (E, n, d)
  Linear gate{nullptr};  // d -> E, no bias
};
TORCH_MODULE(FeedForwardECMoE);

}  // namespace microdit
