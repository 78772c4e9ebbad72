// CPU attention, both passes: bf16 on CPUs with AMX or AVX512-BF16 (model/attention.cpp takes it
// under bf16 autocast), and float32 on CPUs with AVX-512 (float32 training and sampling; under
// bf16 autocast on CPUs with neither).
//
// bf16: ATen's bf16
// attention runs its forward pass on AMX tiles (oneDNN's brgemm), but its backward pass through
// plain bf16 GEMMs, 2.5x slower than the float32 kernel on a Xeon (docs/performance.md); so
// training kept float32 attention, 30 % of a Nano step. These are both passes with their
// products on AMX through the same brgemm, one head at a time with the whole (N, L) score
// matrix in the cache (MicroDiT's sequences are at most a few hundred tokens):
//   forward:  m = max scale q k^T,  P = bf16(exp(scale q k^T - m)),  o = P v / rowsum(exp(...)),
//             lse = m + log(rowsum)  (kept for the backward pass);
//   backward (FlashAttention-2's arithmetic):
//   P = exp(scale q k^T - lse)          (recomputed from the forward pass's log-sum-exp)
//   dV = P^T dO,  dP = dO v^T,  dS = P (dP - rowsum(dO o)),  dQ = scale dS k,  dK = scale dS^T q
// bf16 operands, float32 accumulation and softmax arithmetic; P and dS are rounded to bf16 for
// their products, as a GPU's flash kernels round them.
//
// bf16 on CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and later; kernels/attention_cpu_avx512bf16.cpp):
// the same arithmetic and roundings with the float32 kernels' structure below, every product in
// vdpbf16ps (pairs of bf16 products summed into float32 lanes; twice the float32 rate).
//
// float32: the same passes in float32 P and dS, with no library call: 32 queries at a time,
// the products written out in AVX-512 by broadcasting one operand's entries against the other's
// rows (at 64 keys of 32 the calls and copies around brgemm cost as much as the products). ATen's float32
// flash kernels reach 20-100 GFLOP/s on MicroDiT's short sequences and 32-wide heads on one
// Xeon core, its products alone 140-170 (docs/performance.md).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace microdit::kernels::cpu {

// Whether the AMX kernels can run here: a CPU with AMX for bf16 (and the kernel's leave to use
// it) and a LibTorch whose oneDNN packs bf16 for brgemm.
bool amx_attention_available();

// Whether the AVX512-BF16 kernels can run here (every AMX CPU has it too).
bool avx512_bf16_attention_available();

// Whether attention_forward_bf16 and attention_backward_bf16 can run here: either of the two.
bool bf16_attention_available();

// Whether the shapes suit them: head size a multiple of 16 (brgemm's column blocks, whole
// vectors), at most 256.
bool bf16_attention_applies(int64_t head_dim);

// q (B, H, N, hd), k and v (B, H, L, hd): bf16 CPU tensors with the last dimension contiguous.
// Returns the output (B, H, N, hd) bf16, laid out as (B, N, H, hd), and lse (B, H, N) float32
// (undefined without with_lse: a pass without gradients skips its logarithms).
std::tuple<at::Tensor, at::Tensor> attention_forward_bf16(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, bool with_lse = true);

// q, out, dout (B, H, N, hd); k, v (B, H, L, hd): bf16 CPU tensors with the last dimension
// contiguous (any other strides, as the heads are views of (B, N, H, hd) products); lse (B, H, N)
// float32, the natural log-sum-exp of each row of scale q k^T (attention_forward_bf16's, or ATen's
// flash forward's).
// Returns dq, dk, dv in bf16, shaped as q, k, v and laid out as (B, N, H, hd) in memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_bf16(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& out,
                                                                       const at::Tensor& lse, const at::Tensor& dout,
                                                                       double scale);

// The same passes on AVX512-BF16 whether or not the CPU has AMX (the two functions above take
// them where it has not; tests and benchmarks call them on AMX CPUs too).
std::tuple<at::Tensor, at::Tensor> attention_forward_bf16_avx512(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, double scale,
                                                                 bool with_lse = true);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_bf16_avx512(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& dout, double scale);

// Whether the float32 kernels can run here: a CPU with AVX-512 (F, BW, VL, DQ) and FMA.
bool avx512_attention_available();

// As the bf16 functions, in float32 (any head size): q (B, H, N, hd), k and v (B, H, L, hd)
// float32 CPU tensors with the last dimension contiguous; the output laid out as (B, N, H, hd),
// lse (B, H, N) float32.
std::tuple<at::Tensor, at::Tensor> attention_forward_f32(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale, bool with_lse = true);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_f32(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, const at::Tensor& out,
                                                                      const at::Tensor& lse, const at::Tensor& dout,
                                                                      double scale);

}  // namespace microdit::kernels::cpu
