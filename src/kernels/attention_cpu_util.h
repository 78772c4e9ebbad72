// What the CPU attention kernels share (kernels/attention_cpu.cpp: AMX and float32;
// kernels/attention_cpu_avx512bf16.cpp: bf16 on AVX512-BF16): target attributes, the operand view,
// the float32 tile transpose, the 32-query blocks and the checks of the public functions' inputs.
// Internal to those files.
#pragma once
#include <ATen/core/Tensor.h>

#include <immintrin.h>

#include <cmath>

#include <cstdint>
#include <string>

#include "kernels/avx512_math.h"

namespace microdit::kernels::cpu::attention_detail {

using u16 = uint16_t;  // a bf16 value's bits

// AVX-512 (the float32 kernels), and AVX-512 with its bf16 instructions (the bf16 kernels: every
// AMX CPU has them).
#define MD_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define MD_AVX512_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

MD_AVX512_TARGET inline __attribute__((always_inline)) __mmask16 lanes(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

// 16 bf16 values as floats.
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) __m512 load_bf16(const u16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// sum_c a[c] b[c] over bf16 values, n a multiple of 16.
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) float dot_bf16(const u16* a, const u16* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) acc = _mm512_fmadd_ps(load_bf16(a + c), load_bf16(b + c), acc);
  return _mm512_reduce_add_ps(acc);
}

// One call's tensors: row i of head (b, h) of x starts at x + b * s0 + h * s1 + i * s2.
template <class T>
struct OperandOf {
  const T* p;
  int64_t s0, s1, s2;
  const T* row(int64_t b, int64_t h, int64_t i) const { return p + b * s0 + h * s1 + i * s2; }
};
using Operand = OperandOf<u16>;
using OperandF = OperandOf<float>;

// dst (cols x rows, row stride ldd) = src (rows x cols, row stride lds) transposed, float32, in
// 16 x 16 tiles held in registers (rows and columns past the ends masked off).
MD_AVX512_TARGET inline __attribute__((always_inline)) void transpose_f32(const float* __restrict src, int64_t rows,
                                                                          int64_t cols, int64_t lds,
                                                                          float* __restrict dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c0);
      __m512 r[16], t[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < nr ? _mm512_maskz_loadu_ps(lanes(nc), src + (r0 + i) * lds + c0) : _mm512_setzero_ps();
      // Pairs of floats, then pairs of pairs, then 128-bit quarters: vector c ends as column c.
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]),
                      c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) {
          t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
          t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
      for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
      }
      for (int64_t c = 0; c < nc; ++c) _mm512_mask_storeu_ps(dst + (c0 + c) * ldd + r0, lanes(nr), r[c]);
    }
  }
}

// The forward pass takes 32 queries at a time: two vectors of scores per key.
constexpr int64_t kQueries = 32;
// Both passes take the softmax's exponentials in base 2 (exp2_16, 10 operations against exp16's 15):
// exp(y) = 2^(y log2 e), log2 e folded into the scale.
constexpr float kLog2e = 1.44269504088896341f;

// A block's softmax, forward (the float32 and AVX512-BF16 kernels): st holds S^T (L, 32) of 32
// queries with the maxima m0, m1 over keys (lanes 0-15, 16-31); turns it into P^T = exp(scale S^T -
// scale m) in place, writes inv[i] = 1 / sum_j P^T[j, i] (32 values, 64-byte aligned) and, where
// lse is given, lse[i] = scale m + log(sum_j P^T[j, i]) for the block's nq queries.
MD_AVX512_TARGET inline __attribute__((always_inline)) void softmax_block_forward(float* st, int64_t L, float scale,
                                                                                  __m512 m0, __m512 m1, float* inv,
                                                                                  float* lse, int64_t nq) {
  const __m512 vs = _mm512_set1_ps(scale), vs2 = _mm512_set1_ps(scale * kLog2e);  // scale, in base 2
  const __m512 e0 = _mm512_mul_ps(m0, vs2), e1 = _mm512_mul_ps(m1, vs2);         // the maxima in base 2 (scale > 0)
  __m512 l0 = _mm512_setzero_ps(), l1 = l0;
  for (int64_t j = 0; j < L; ++j) {  // P^T = 2^(log2 e (scale S^T - scale m)) and its column sums
    float* s = st + j * kQueries;
    const __m512 p0 = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s), vs2, e0));
    const __m512 p1 = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16), vs2, e1));
    _mm512_storeu_ps(s, p0);
    _mm512_storeu_ps(s + 16, p1);
    l0 = _mm512_add_ps(l0, p0);
    l1 = _mm512_add_ps(l1, p1);
  }
  _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), l0));
  _mm512_store_ps(inv + 16, _mm512_div_ps(_mm512_set1_ps(1.0f), l1));
  if (lse) {
    alignas(64) float ms[kQueries], ls[kQueries];
    _mm512_store_ps(ms, _mm512_mul_ps(m0, vs));
    _mm512_store_ps(ms + 16, _mm512_mul_ps(m1, vs));
    _mm512_store_ps(ls, l0);
    _mm512_store_ps(ls + 16, l1);
    for (int64_t i = 0; i < nq; ++i) lse[i] = ms[i] + std::log(ls[i]);
  }
}

// A block's softmax gradient: st holds S^T and dpt dP^T (L, 32) of 32 queries, lse and d (32
// values each, 64-byte aligned) their log-sum-exps and D = rowsum(dO o O). Turns st into P^T =
// exp(scale S^T - lse) and dpt into scale dS^T = scale P^T (dP^T - D), in place.
MD_AVX512_TARGET inline __attribute__((always_inline)) void softmax_block_backward(float* st, float* dpt, int64_t L,
                                                                                   float scale, const float* lse,
                                                                                   const float* d) {
  const __m512 vs = _mm512_set1_ps(scale), vs2 = _mm512_set1_ps(scale * kLog2e);
  const __m512 log2e = _mm512_set1_ps(kLog2e);  // the log-sum-exps in base 2
  const __m512 l0 = _mm512_mul_ps(_mm512_load_ps(lse), log2e), l1 = _mm512_mul_ps(_mm512_load_ps(lse + 16), log2e);
  const __m512 d0 = _mm512_load_ps(d), d1 = _mm512_load_ps(d + 16);
  for (int64_t j = 0; j < L; ++j) {
    float *s = st + j * kQueries, *dp = dpt + j * kQueries;
    const __m512 p0 = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s), vs2, l0));
    const __m512 p1 = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16), vs2, l1));
    _mm512_storeu_ps(s, p0);
    _mm512_storeu_ps(s + 16, p1);
    _mm512_storeu_ps(dp, _mm512_mul_ps(_mm512_mul_ps(p0, _mm512_sub_ps(_mm512_loadu_ps(dp), d0)), vs));
    _mm512_storeu_ps(dp + 16, _mm512_mul_ps(_mm512_mul_ps(p1, _mm512_sub_ps(_mm512_loadu_ps(dp + 16), d1)), vs));
  }
}

// The products by broadcasting that need R x V accumulators: V vectors of the head width, as
// many rows as keep 16 (or 8) accumulators busy.
#define MD_BY_WIDTH(nvec, call)               \
  do {                                         \
    if ((nvec) <= 1) {                         \
      call(8, 1);                              \
    } else if ((nvec) <= 2) {                  \
      call(8, 2);                              \
    } else if ((nvec) <= 4) {                  \
      call(4, 4);                              \
    } else {                                   \
      call(2, 8);                              \
    }                                          \
  } while (0)

// Throws "CPU <dtype> attention: what" unless ok.
void check(bool ok, at::ScalarType dt, const std::string& what);
// The checks both passes make of q (B, H, N, hd) and k, v (B, H, L, hd) in dtype dt (not of the CPU).
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::ScalarType dt);
// The checks of the backward pass's other inputs: out and dout shaped as q, lse (B, H, N) float32.
void check_backward_inputs(const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
                           at::ScalarType dt);

inline Operand operand(const at::Tensor& t) {
  return Operand{reinterpret_cast<const u16*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}
inline OperandF operand_f32(const at::Tensor& t) {
  return OperandF{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

}  // namespace microdit::kernels::cpu::attention_detail
