// QK-normed self- and cross-attention (reference: SelfAttention, CrossAttention in utils.py).
// LN0 (no parameters) normalises the whole h-wide q and k across all heads at once.
#pragma once
#include "model/layers.h"

#include <string>
#include <vector>

namespace microdit {

struct SelfAttentionImpl : torch::nn::Module {
  // d: block width; h: attention width (heads * head_dim).
  SelfAttentionImpl(int64_t d, int64_t h, int64_t heads, bool bias, double eps);
  Tensor forward(const Tensor& x);  // (B, N, d) -> (B, N, d)
  int64_t h, heads;
  Linear qkv{nullptr}, proj{nullptr};  // d -> 3h laid out [q | k | v]; h -> d
  LayerNorm ln_q{nullptr}, ln_k{nullptr};
};
TORCH_MODULE(SelfAttention);

// A cross-attention's keys and values of the caption tokens, (B, L, heads, hd) each. They
// depend on the caption only, so a sampler computes them once for all its steps.
struct CaptionKV {
  Tensor k, v;
};

struct CrossAttentionImpl : torch::nn::Module {
  CrossAttentionImpl(int64_t d, int64_t h, int64_t heads, bool bias, double eps);
  CaptionKV caption_kv(const Tensor& cond);              // cond (B, L, d)
  // From the product p = kv_linear(cond) (B, L, 2h) = [k | v], which may be a column slice of a
  // wider product (caption_kvs).
  CaptionKV caption_kv_from_product(const Tensor& p);
  Tensor forward(const Tensor& x, const CaptionKV& kv);   // x (B, N, d) -> (B, N, d)
  int64_t h, heads;
  Linear q_linear{nullptr}, kv_linear{nullptr}, proj{nullptr};  // kv: [k | v]
  LayerNorm ln_q{nullptr}, ln_k{nullptr};
};
TORCH_MODULE(CrossAttention);

// The keys and values of several cross-attentions from one caption cond (B, L, d): one product
// with their [k | v] weights side by side, (B, L, n * 2h), instead of one per layer, so that
// under autocast cond is cast once and its gradient comes out of one product (summed inside it)
// instead of n products, casts and adds; with the fused kernels one function takes all the k
// norms and writes their gradients into one gradient of that product. Each layer keeps its own
// parameters (checkpoints, optimizer). Layers of unequal widths or norms take one product each.
std::vector<CaptionKV> caption_kvs(const std::vector<CrossAttentionImpl*>& layers, const Tensor& cond);

// Scaled dot-product attention over heads: q (B, N, H, hd), k/v (B, M, H, hd) -> (B, N, H*hd).
// On the CPU it takes the kernel cpu_attention_kernel(hd) names: under bf16 autocast the float32
// kernels (on the bf16-rounded inputs) return float32, the bf16 kernels bf16.
Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v);

// Attention on the CPU (--cpu-attention):
//   automatic: under bf16 autocast microdit's bf16 kernels where the CPU has AMX for bf16 or
//     AVX512-BF16 and the head size is a multiple of 16 (up to 256), else float32 (ATen's bf16
//     backward pass is the slow one);
//   float32: always float32;
//   aten_float32: always float32, ATen's kernels (for comparison);
//   bf16: under bf16 autocast ATen's bf16 attention, both ways (slow on the CPU, but it keeps
//     what a GPU keeps for the backward pass: `bench --memory` with it predicts GPU memory).
// Float32 is microdit's kernels (kernels/attention_cpu.h) on CPUs with AVX-512, else ATen's.
enum class CpuAttention { automatic, float32, aten_float32, bf16 };
void set_cpu_attention(CpuAttention mode);
CpuAttention cpu_attention();
CpuAttention parse_cpu_attention(const std::string& name);  // auto, float32, aten-float32 or bf16
// The kernels of CPU attention:
//   float32: microdit's float32 kernels (AVX-512), without autocast and under it on the inputs
//     rounded to the autocast dtype;
//   aten_float32: the same with ATen's float32 attention;
//   aten_bf16: ATen's bf16 attention, forward and backward;
//   amx_bf16: microdit's bf16 kernels on AMX tiles;
//   avx512_bf16: microdit's bf16 kernels in AVX512-BF16's vdpbf16ps (CPUs with it and no AMX).
enum class CpuAttentionKernel { float32, aten_float32, aten_bf16, amx_bf16, avx512_bf16 };
// The kernel CPU attention with head size hd takes now (float32 or aten_float32 unless bf16
// autocast is on).
CpuAttentionKernel cpu_attention_kernel(int64_t hd);
// "float32", "float32 ATen", "bf16 ATen", "bf16 AMX", "bf16 AVX512-BF16"
const char* cpu_attention_kernel_name(CpuAttentionKernel kernel);

}  // namespace microdit
