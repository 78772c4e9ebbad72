// Feed-forward layers: dense SwiGLU and expert-choice mixture-of-experts
// (reference: FeedForward, FeedForwardECMoe in dit.py).
#pragma once
#include "model/layers.h"

namespace microdit {

// Keeping fewer activations in the feed-forward layers: the backward pass computes silu(u),
// silu(u) * v and gelu(a) again (cheap elementwise work) instead of keeping them from the
// forward pass. For MicroDiT_XL_2 at batch 256 with mask 0.75 that is 4 of the 6 hidden-wide
// tensors of a dense block and 1 of the 2 of an expert block, about 7 GB. Same values, same
// gradients up to float rounding. `cuda` (the default) does it on CUDA tensors only, where
// memory bounds the batch; the CPU path stays as it was.
enum class RecomputeFfn { off, cuda, always };
void set_recompute_ffn(RecomputeFfn mode);
RecomputeFfn recompute_ffn();
RecomputeFfn parse_recompute_ffn(const std::string& name);  // "off", "cuda", "always"
bool recompute_ffn_for(const Tensor& x);

// How the expert-choice layer moves tokens to and from its experts:
//   index: one index_select gathers the picked tokens and one index_add sums the experts'
//     outputs back (its backward and the gather's are index_adds: atomics on a GPU);
//   gemm: batched matrix products with the one-hot routing matrix P (B, E*k, T), as the
//     reference's einsums do: xin = P x, out = P^T (g * h). No atomics, and under autocast the
//     products and their output are bf16, as the reference's are. 2*B*T*E*k*d more FLOPs per
//     product: under 0.1 % of an XL step on a GPU; a Nano step on the CPU ran 1 % slower;
//   gather: the gemm dispatch's values without its products or layout copies: one index_select
//     writes the picked tokens straight in the experts' layout (E, B, k, d), and one kernel per
//     token row (moe_expert_sum) sums the experts' weighted outputs, and the gather's gradient,
//     in float32 in expert order with each term rounded as the products round it. No atomics.
//     Needs the fused kernels (CUDA: compiled with nvcc);
//   automatic (the default): gather on CUDA tensors when the fused kernels are on and compiled
//     in (else gemm); on the CPU index while autograd records (training: its backward pass is
//     the faster there) and gather when it does not (sampling, evaluation: its forward pass is
//     3-4 % faster on the emoji sampler), gather only with the fused kernels on.
enum class MoeDispatch { automatic, index, gemm, gather };
void set_moe_dispatch(MoeDispatch mode);
MoeDispatch moe_dispatch();
MoeDispatch parse_moe_dispatch(const std::string& name);  // "auto", "index", "gemm", "gather"
// The dispatch for tensors of this device (never automatic); `grad`: whether autograd records
// the layer (at::GradMode), which decides the CPU's automatic choice.
MoeDispatch moe_dispatch_on(c10::DeviceType device, bool grad = true);
// The gemm dispatch's combine: P^T (g * h^T) for the one-hot P (B, E*k, T), the experts' output
// h (E, B, k, d) as they write it and g (B, E, k), -> (B, T, d), where h^T (B, E, k, d) swaps
// h's first two dims. The same values and gradients as that expression under autograd (and
// autocast), but its backward pass keeps P, h and g instead of g * h^T and its cast copy, and
// writes h's gradient in h's own layout (no copies between the two layouts either way).
Tensor moe_combine(const Tensor& P, const Tensor& h, const Tensor& g);

// gelu(a) @ w per expert: a (E, M, n), w (E, n, d) -> (E, M, d), in the autocast dtype under
// autocast. recompute: keeps a and w only (w as the float32 parameter, not a cast copy).
// Without autograd (at::GradMode off) GELU overwrites a: pass a product's fresh output.
Tensor gelu_bmm(Tensor a, const Tensor& w, bool recompute);

// w3(silu(u) * v) for u, v (..., n). recompute: keeps u, v and w3's parameters only. Without
// autograd, a handed-over u (a temporary, or std::move) receives silu(u) * v (model/fused.h).
Tensor swiglu_linear(Tensor u, const Tensor& v, Linear& w3, bool recompute);

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
