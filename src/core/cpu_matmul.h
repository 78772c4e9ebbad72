// float32 matrix products on the CPU through oneDNN or microdit's own kernels instead of MKL.
//
// LibTorch sends float32 `linear`, `mm` and `bmm` on the CPU to MKL's sgemm. On AMD CPUs MKL
// runs its generic kernels; oneDNN (also inside LibTorch, reached through the
// `mkldnn::_linear_pointwise` operator) picks its kernels by instruction set and is 2.2x faster
// on the MicroDiT shapes measured on a Zen 4 core (docs/performance.md). bf16 products already
// go to oneDNN, so only float32 outside autocast takes this path.
//
// On Intel CPUs MKL runs its own tuned kernels and beats oneDNN (8 % on a Xeon with AVX-512
// and AMX, MicroDiT_Nano_2 fp32 training); microdit's own AVX-512 kernels (kernels/gemm_cpu.h)
// are on a par with MKL at MicroDiT's shapes (Nano training within 0-4 % of it on a Xeon
// without AMX), 6-8 % faster than oneDNN on a Zen 4 EPYC, and take GELU inside the expert FFN's
// products (7 % less memory), so they are the default on CPUs that have AVX-512.
//
// `linear` and `bmm` below are drop-in replacements for at::linear and at::bmm, with their own
// autograd (both gradients take the same path). Anything that is not a float32 CPU tensor, or
// runs under autocast, goes to the ATen operator unchanged.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace microdit {

// kOwn: microdit's own AVX-512 kernels (kernels/gemm_cpu.h).
enum class CpuMatmul { kOneDnn, kMkl, kOwn };

// Process-wide choice for float32 CPU products; the default is default_cpu_fp32_matmul().
void set_cpu_fp32_matmul(CpuMatmul m);
CpuMatmul cpu_fp32_matmul();

// kOwn packs each panel of 14 rows of A once for all of C's columns; with fewer than 256
// columns that costs more than MKL's way (Pico's 128-wide products ran 3-9 % slower on a
// Xeon), so those products go to MKL (LibTorch's ATen operators) on Intel CPUs even in that
// mode, and to oneDNN on the others (where MKL runs its generic kernels). The
// setter is for tests, which make every product take microdit's kernels.
constexpr int64_t kOwnMinColumns = 256;
constexpr int64_t kOwnMinRows = 128;  // and rows and depth (K), or own_min_columns() if lower
void set_own_min_columns(int64_t n);
int64_t own_min_columns();
// kOwn on CPUs with AVX-512; without it kMkl on Intel CPUs and kOneDnn on the others (AMD's
// among them: MKL runs generic kernels there).
CpuMatmul default_cpu_fp32_matmul();
// "auto" / "onednn" / "mkl" / "microdit" -> CpuMatmul ("auto": the default above); parse fails with a
// one-line error naming the value.
CpuMatmul parse_cpu_matmul(const std::string& name);
const char* cpu_matmul_name(CpuMatmul m);

// Under CPU bf16 autocast (and for bf16 operands outside it), `linear` and `bmm` below multiply
// through microdit's AVX512-BF16 kernels (kernels/gemm_cpu.h: gemm_bf16) instead of autocast's
// casts and oneDNN: on CPUs with AVX512-BF16 and without AMX (where oneDNN's AMX kernels are
// faster), under kOwn. The arithmetic is autocast's: operands rounded to bf16, float32 sums, a
// bf16 result, and each gradient a bf16 product cast back to its input's dtype.
bool own_bf16_products();

// True when a product of these operands takes the oneDNN path (or microdit's own) now.
bool uses_onednn_fp32(const at::Tensor& a, const at::Tensor& b);

// x (..., K), w (N, K), b (N,) or undefined -> (..., N); same as at::linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = {});
// a (E, M, K) @ b (E, K, N) -> (E, M, N); same as at::bmm.
at::Tensor bmm(const at::Tensor& a, const at::Tensor& b);

// GELU(a) @ w for a (E, M, n), w (E, n, d), with autograd, on microdit's own kernels: GELU is
// taken as a's panels are packed (in the forward pass, and again for w's gradient) and GELU'
// as a's gradient is stored, so neither GELU(a) nor the gradient before GELU' is ever written
// to memory. Applies to float32 CPU tensors, a contiguous, under --cpu-matmul microdit, outside
// autocast, for products microdit's kernels take (d columns, M rows and n deep, as above);
// elsewhere the caller runs the plain operators.
bool gelu_bmm_fused_applies(const at::Tensor& a, const at::Tensor& w);
at::Tensor gelu_bmm_fused(const at::Tensor& a, const at::Tensor& w);

// GELU(a @ w) for a (E, M, K), w (E, K, N) without autograd (inference: sampling, evaluation), on
// microdit's own kernels: GELU is taken as the product's values are stored, so the activation
// needs no pass of its own over memory. Applies where gelu_bmm_fused would (float32 CPU tensors,
// --cpu-matmul microdit, outside autocast, a product microdit's kernels take) and autograd does
// not record; elsewhere the caller runs the plain operators.
bool bmm_gelu_applies(const at::Tensor& a, const at::Tensor& w);
at::Tensor bmm_gelu(const at::Tensor& a, const at::Tensor& w);

// While one lives, the bf16 products of microdit's own (own_bf16_products) pack each of these
// weights once per layout they read it in (x W^T in the forward pass, dY W in the backward
// pass, an expert weight (E, K, N) and its transpose) and reuse the packs, where they would
// otherwise round and lay out the weight again at every product. The weights must keep their
// values while it lives: a training step's forward and backward passes on all CPU workers
// (train/parallel_backward.h), a sampling run (diffusion/edm.h). Scopes may nest and overlap
// (two workers' sampling chunks share the packs); a weight's packs are freed when the last scope
// naming it ends, or packed again if its version counter moves (an in-place change) meanwhile.
// The values are the same, bit for bit, as without the scope. With set_pack_weights(false) a
// scope does nothing (for comparisons: tests, measurements).
class PackedWeights {
 public:
  explicit PackedWeights(const std::vector<at::Tensor>& weights);
  ~PackedWeights();
  PackedWeights(const PackedWeights&) = delete;
  PackedWeights& operator=(const PackedWeights&) = delete;

 private:
  bool active_;
  std::vector<const void*> keys_;
};
void set_pack_weights(bool on);
bool pack_weights();

// Packs held at once at most (beyond it a product packs its weight itself, as without a scope):
// a Pico model's are 15 MB in both layouts, MicroDiT_XL_2's 4.6 GB.
constexpr int64_t kPackedWeightBudget = int64_t{1} << 30;

// Counts since the process started (packs: weights packed; lookups: products that took a pack,
// each but the first of a pack a reuse), the bytes held now by live scopes' packs, and the
// bytes of ended scopes' pack storage kept for the next scopes' packs (spare_bytes).
struct PackedWeightStats {
  int64_t packs = 0, lookups = 0, over_budget = 0, bytes = 0, spare_bytes = 0;
};
PackedWeightStats packed_weight_stats();

}  // namespace microdit
