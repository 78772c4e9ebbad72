// float32 matrix products on AVX-512 CPUs, without a library call (kernels/gemm_cpu.cpp).
//
// C (M x N) = A (M x K) B (K x N) [+ bias], with either operand read through its two strides,
// so that x W^T, dY W and dY^T X (a linear layer's product and both gradients) need no copy.
// The blocking is the classic one: B in panels of 32 columns (packed once per 256 rows of K),
// A in panels of 14 rows (packed one at a time, the next one's rows prefetched while the
// current one runs), and a 14 x 32 kernel of 28 accumulators that runs at 98 % of the core's
// FMA rate when its panels are in cache. core/cpu_matmul.h decides when it is used.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace microdit::kernels::cpu {

// A matrix read in place: element (r, c) lies at p[r * rs + c * cs].
struct StridedMatrix {
  const float* p;
  int64_t rs, cs;
};

// Elementwise work a product can do on the way instead of in passes of its own over memory:
// - gelu_a: A's values go through GELU (the exact form) as they are packed: C = GELU(A) B;
// - gelu_grad_at: C's values are multiplied by GELU'(X[m, n]) as they are stored, X read with
//   row stride ld_gelu_grad: C = (A B) * GELU'(X), GELU's backward pass after the product;
// - gelu_out: C's values go through GELU as they are stored (after the bias and the sum with C,
//   after gelu_grad_at): C = GELU(A B), an activation without a pass of its own.
struct GemmExtras {
  bool gelu_a = false;
  const float* gelu_grad_at = nullptr;
  int64_t ld_gelu_grad = 0;
  bool gelu_out = false;
};

// True on CPUs with AVX-512 F (the only instruction set gemm_f32 has a kernel for).
bool gemm_f32_available();

// C[m, n] = sum_k A(m, k) B(k, n) (+ C[m, n] when accumulate) (+ bias[n] when bias != nullptr),
// C's rows ldc floats apart. Runs on the intra-op threads (panels of A side by side) unless
// called inside a parallel region or on one thread. M, N >= 1, K >= 0.
void gemm_f32(int64_t M, int64_t N, int64_t K, StridedMatrix a, StridedMatrix b, float* C, int64_t ldc,
              bool accumulate, const float* bias, const GemmExtras& extras = {});

// An operand in float32 or bf16 (its 16-bit patterns), read in place: element (r, c) at
// p[r * rs + c * cs] of its type.
struct AnyMatrix {
  const void* p;
  int64_t rs, cs;
  bool bf16;
};

// True on CPUs with AVX512-BF16 (vdpbf16ps), the one instruction gemm_bf16 multiplies with.
bool gemm_bf16_available();

// What gemm_bf16 writes: float32 sums, those sums rounded to bf16, or the rounded values widened
// back to float32 (what a bf16 product cast to float32 holds: autocast's gradients of float32
// inputs).
enum class Bf16Out { kFloat, kBf16, kFloatOfBf16 };

// C[m, n] = sum_k A(m, k) B(k, n) (+ bias[n] when bias != nullptr) (+ C[m, n] when accumulate
// and `out` is kFloat), each operand (and the bias) rounded to bf16 (nearest even) as it is
// packed, the products summed in float32 (kernels/gemm_cpu_bf16.cpp), C written as `out` says,
// its rows ldc elements apart. Runs on the intra-op threads unless called inside a parallel
// region or on one thread. M, N >= 1, K >= 0.
void gemm_bf16(int64_t M, int64_t N, int64_t K, const AnyMatrix& a, const AnyMatrix& b, void* C, Bf16Out out,
               int64_t ldc, bool accumulate, const float* bias);

// B (K x N) as gemm_bf16 packs it (rounded to bf16, in its panels), kept for many products with
// the same B: a weight through a training step or a sampling run (core/cpu_matmul.h,
// PackedWeights). Read-only once made, so any number of threads may multiply with it at once.
struct PackedBf16 {
  int64_t K = 0, N = 0;
  int64_t bytes = 0;
  std::unique_ptr<uint32_t, decltype(&std::free)> words{nullptr, &std::free};
};
PackedBf16 pack_bf16(int64_t K, int64_t N, const AnyMatrix& b);
// The same in pieces, so that several threads may fill one pack at once: its storage (not yet
// filled), its number of panels (32 columns each), and panels [p0, p1) of B packed into it.
PackedBf16 packed_bf16_storage(int64_t K, int64_t N);
int64_t packed_bf16_bytes(int64_t K, int64_t N);  // the storage's size (its `bytes`), N > 0
int64_t packed_bf16_panels(const PackedBf16& p);
void pack_bf16_panels(const AnyMatrix& b, PackedBf16& p, int64_t p0, int64_t p1);

// gemm_bf16 with B packed beforehand: the same values, bit for bit, as with B itself.
void gemm_bf16(int64_t M, const AnyMatrix& a, const PackedBf16& b, void* C, Bf16Out out, int64_t ldc, bool accumulate,
               const float* bias);

}  // namespace microdit::kernels::cpu
