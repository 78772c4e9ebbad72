// Autograd functions over the fused kernels (kernels/fused.h): what LibTorch runs as a chain
// of memory-bound operators around every matmul of a block, in one pass each way. On CUDA
// tensors they run the CUDA kernels, on CPU tensors (float32, bf16) their CPU versions.
// The model calls them when its `fused_kernels` switch is on (the default; model/layers.h)
// and takes LibTorch's operators otherwise; tests/test_fused.cpp holds the two against each
// other.
#pragma once
#include <torch/types.h>

#include <tuple>
#include <utility>
#include <vector>

namespace microdit {

using torch::Tensor;

// True when `x` is a tensor the kernels take: float32 or bf16 on the CPU; float32, bf16 or
// f16 on CUDA when the CUDA kernels are compiled in.
bool fused_kernels_apply(const Tensor& x);

// LayerNorm over the last dimension, times `weight` (d) when defined, then, when shift and scale
// (B, d) are defined, * (1 + scale[b]) + shift[b] for x (B, T, d). Without them x may have any
// shape (..., d). The result is in `out`; the statistics are taken over x rounded to `save`,
// and that rounded x is what the backward pass keeps (x itself when `save` is x's dtype).
Tensor fused_modulated_layer_norm(const Tensor& x, const Tensor& weight, const Tensor& shift,
                                  const Tensor& scale, double eps, at::ScalarType out,
                                  at::ScalarType save);

// The same for x (B, T, d), returning (x, y): x handed on as a view for the residual stream, y
// the norm. The backward pass adds the gradient that reaches x through the residual stream to
// the norm's dx in its kernel (autograd would add the two in a kernel of its own). The same
// values either way.
std::pair<Tensor, Tensor> fused_residual_layer_norm(const Tensor& x, const Tensor& weight, const Tensor& shift,
                                                    const Tensor& scale, double eps, at::ScalarType out,
                                                    at::ScalarType save);

// The self-attention's (LN(q), LN(k), v) from its product qkv (..., 3h) = [q | k | v], the norms
// without weight (the "LN0" of q and k), v a view of qkv. The backward pass writes the norms'
// dx and dv into one gradient of qkv instead of autograd's cat of three; the same values.
std::tuple<Tensor, Tensor, Tensor> fused_qkv_norm(const Tensor& qkv, double eps, at::ScalarType out,
                                                  at::ScalarType save);

// The cross-attention's (LN(k), v) from its product kv (..., 2h) = [k | v], as fused_qkv_norm.
std::pair<Tensor, Tensor> fused_kv_norm(const Tensor& kv, double eps, at::ScalarType out, at::ScalarType save);
// The same for n cross-attentions' products side by side, kv (..., 2nh) = [k0 | v0 | k1 | v1 ...]:
// (LN(k0), v0, LN(k1), v1, ...), their gradients written into one gradient of kv.
std::vector<Tensor> fused_kv_norms(const Tensor& kv, int64_t n, double eps, at::ScalarType out, at::ScalarType save);

// x + gate[b] * h: x (B, T, d) (the residual stream, and the result's dtype), gate (B, d),
// h (B, T, d). When nothing records gradients (sampling) and the caller hands h over (a
// temporary, or std::move: this is the only handle and nothing shares its memory), the sum is
// written over h: its lines are in cache, having just been read, where a new tensor's are not.
Tensor fused_gated_residual(const Tensor& x, const Tensor& gate, Tensor h);

// Inference only (not an autograd function): (s, y) for the residual sum s = x + gate[b] * h
// (x + h when gate is undefined) and y = fused_modulated_layer_norm(s, weight, shift, scale) in
// float32, in one pass over the rows instead of two (the sum is not read back). The same bits
// as fused_gated_residual (or x + h) followed by the norm. x, h (B, T, d); gate, shift, scale
// (B, d) or undefined; weight (d) or undefined. fused_residual_norm_applies says whether the
// kernel takes them: float32 CPU tensors, contiguous, d a multiple of 16, an AVX-512 CPU.
// A handed-over h (as fused_gated_residual's) receives the sum.
bool fused_residual_norm_applies(const Tensor& x, const Tensor& gate, const Tensor& h, const Tensor& weight,
                                 const Tensor& shift, const Tensor& scale);
std::pair<Tensor, Tensor> fused_residual_norm(const Tensor& x, const Tensor& gate, Tensor h,
                                              const Tensor& weight, const Tensor& shift, const Tensor& scale,
                                              double eps);

// Inference only: x (..., d) replaced by its LayerNorm (times weight (d) where defined), as
// fused_modulated_layer_norm computes it, for x a temporary the caller owns or a column slice
// of one (rows contiguous, any row stride: q or k in the attention's qkv product), so that no
// new tensor is written. fused_norm_in_place_applies: float32 CPU, d a multiple of 16, AVX-512.
bool fused_norm_in_place_applies(const Tensor& x, const Tensor& weight);
void fused_norm_in_place(const Tensor& x, const Tensor& weight, double eps);

// SwiGLU's elementwise part silu(u) * v, for u and v of one shape, dtype and device that
// fused_kernels_apply takes.
bool fused_swiglu_applies(const Tensor& u, const Tensor& v);
// As an autograd function: keeps u and v (LibTorch's silu and mul keep u, silu(u) and v).
Tensor fused_swiglu(const Tensor& u, const Tensor& v);
// The kernels alone, for autograd functions with their own backward pass (model/ffn.cpp):
// silu(u) * v, and the gradients (du, dv) from dp, the gradient of silu(u) * v.
// A handed-over u (a temporary, or std::move) receives silu(u) * v when nothing records
// gradients (on the CPU), as fused_gated_residual's h does.
Tensor swiglu_product(Tensor u, const Tensor& v);
std::pair<Tensor, Tensor> swiglu_grads(const Tensor& dp, const Tensor& u, const Tensor& v);

// The expert-choice layer's sums (kernels::moe_scatter_sum) on src's device, not an autograd
// function (model/ffn.cpp wraps it): src (E, B, k, d) rows of the experts' slots, w (B, E, k)
// their weights (float32, or undefined for weight 1), inv (B, T, E) int32 the slot expert e gave
// token t of sample b (-1: none). Returns (B, T, d) in dt, row (b, t) the sum over the experts
// e that picked it of round_dt(w[b, e, s] src[e, b, s]) in float32 (s = inv[b, t, e]), in
// expert order; zero for a token no expert picked.
Tensor moe_expert_sum(const Tensor& src, const Tensor& w, const Tensor& inv, at::ScalarType dt);
// Whether moe_expert_sum takes `experts` experts' rows like `x` (its device and dtype) summed in dt:
// at most 64 experts, and the fused kernels' dtypes (float32 or bf16 on the CPU).
bool moe_expert_sum_applies(const Tensor& x, int64_t experts, at::ScalarType dt);

}  // namespace microdit
