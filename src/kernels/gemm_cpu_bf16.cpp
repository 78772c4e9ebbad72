// bf16 products for CPUs with AVX512-BF16 (kernels/gemm_cpu.h: gemm_bf16).
//
// vdpbf16ps adds to float32 lane c the products of bf16 pair c of its operands:
//   acc[c] += a[2c] b[2c] + a[2c+1] b[2c+1]
// so the inner dimension K runs in pairs (k, k+1): A's panel holds, per pair, one 32-bit word
// (A(i, k), A(i, k+1)) for each of its 14 rows (broadcast against B), and B's panels hold per
// pair 32 columns of words (B(k, n), B(k+1, n)). Packing rounds float32 operands to bf16
// (nearest even, as a cast does) on the way, so neither operand is cast in a pass of its own.
// A 14 x 32 tile is 28 accumulators, as in the float32 kernels; K is not blocked (the shapes
// this serves are at most a few thousand deep), an odd K pads its last pair with zero. A bf16 A
// whose rows run along K needs no packing: its rows are read in place.
#include "kernels/gemm_cpu.h"
#include "kernels/cpu_math.h"
#include "kernels/gemm_cpu_util.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace microdit::kernels::cpu {

namespace {

#define MD_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define MD_BF16_INLINE inline __attribute__((always_inline))

using u16 = uint16_t;
using u32 = uint32_t;

constexpr int64_t kMr = 14;    // rows of A per panel
constexpr int64_t kNr = 32;    // columns of B per panel (two vectors of 16 pairs)
constexpr int64_t kNc = 1024;  // columns per packed block of B

using Buffer = gemm_detail::AlignedBuffer<u32>;
using gemm_detail::low_lanes;
using gemm_detail::transpose16;

// Element (r, c) of an operand as bf16 bits.
MD_BF16_INLINE u16 element(const AnyMatrix& m, int64_t r, int64_t c) {
  const int64_t at = r * m.rs + c * m.cs;
  return m.bf16 ? static_cast<const u16*>(m.p)[at] : float_to_bf16_bits(static_cast<const float*>(m.p)[at]);
}

// n <= 16 consecutive elements from p (float32 rounded, or bf16 bits), zeros after them.
MD_BF16_TARGET MD_BF16_INLINE __m256i load16(const void* p, int64_t offset, bool bf16, int64_t n) {
  const __mmask16 m = low_lanes(n);
  if (bf16) return _mm256_maskz_loadu_epi16(m, static_cast<const u16*>(p) + offset);
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + offset));
}

// 32 consecutive values (n of them, zeros after) as 16 pairs: word c = (v[2c], v[2c+1]).
MD_BF16_TARGET MD_BF16_INLINE __m512i load_pairs(const void* p, int64_t offset, bool bf16, int64_t n) {
  const __m256i lo = load16(p, offset, bf16, n), hi = load16(p, offset + 16, bf16, n - 16);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// Word c = (a[c], b[c]): two runs of 16 values interleaved into pairs.
MD_BF16_TARGET MD_BF16_INLINE __m512i interleave(__m256i a, __m256i b) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// Ap[q * kMr + i] = (A(i, 2q), A(i, 2q+1)) for i < r (r <= kMr; zeros up to kMr), q < (K + 1) / 2.
MD_BF16_TARGET void pack_a(int64_t r, int64_t K, const AnyMatrix& a, u32* Ap) {
  const int64_t pairs = (K + 1) / 2;
  if (a.cs == 1) {  // rows contiguous in k: 16 pairs of each row, then transposed
    const __mmask16 rows = low_lanes(kMr);
    for (int64_t q = 0; q < pairs; q += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = i < r ? load_pairs(a.p, i * a.rs + 2 * q, a.bf16, K - 2 * q) : _mm512_setzero_si512();
      transpose16(v);
      for (int64_t j = 0; j < std::min<int64_t>(16, pairs - q); ++j)
        _mm512_mask_storeu_epi32(Ap + (q + j) * kMr, rows, v[j]);
    }
  } else if (a.rs == 1) {  // columns contiguous in i: two columns of A interleaved per pair
    for (int64_t q = 0; q < pairs; ++q) {
      const __m256i k0 = load16(a.p, 2 * q * a.cs, a.bf16, r);
      const __m256i k1 = 2 * q + 1 < K ? load16(a.p, (2 * q + 1) * a.cs, a.bf16, r) : _mm256_setzero_si256();
      _mm512_mask_storeu_epi32(Ap + q * kMr, low_lanes(kMr), interleave(k0, k1));
    }
  } else {
    for (int64_t q = 0; q < pairs; ++q)
      for (int64_t i = 0; i < kMr; ++i) {
        const u32 lo = i < r ? element(a, i, 2 * q) : 0, hi = i < r && 2 * q + 1 < K ? element(a, i, 2 * q + 1) : 0;
        Ap[q * kMr + i] = lo | (hi << 16);
      }
  }
}

// B's block (K x nc) in panels of kNr columns: panel p at Bp + p * pairs * kNr, word
// [q * kNr + c] = (B(2q, n), B(2q+1, n)) for n = p * kNr + c, zeros past nc and K.
MD_BF16_TARGET void pack_b(int64_t K, int64_t nc, const AnyMatrix& b, u32* Bp) {
  const int64_t pairs = (K + 1) / 2;
  if (b.cs == 1) {  // rows contiguous in n: two rows interleaved
    for (int64_t q = 0; q < pairs; ++q) {
      const int64_t k0 = 2 * q * b.rs, k1 = (2 * q + 1) * b.rs;
      const bool odd = 2 * q + 1 >= K;
      for (int64_t n = 0; n < nc; n += kNr) {
        u32* dst = Bp + (n / kNr) * pairs * kNr + q * kNr;
        for (int64_t h = 0; h < kNr; h += 16) {
          const int64_t w = nc - n - h;
          const __m256i r0 = load16(b.p, k0 + n + h, b.bf16, w);
          const __m256i r1 = odd ? _mm256_setzero_si256() : load16(b.p, k1 + n + h, b.bf16, w);
          _mm512_store_si512(dst + h, interleave(r0, r1));
        }
      }
    }
  } else if (b.rs == 1) {  // columns contiguous in k (W^T of a weight W (N, K)): pairs transposed
    for (int64_t n = 0; n < nc; n += kNr) {
      u32* dst = Bp + (n / kNr) * pairs * kNr;
      for (int64_t h = 0; h < kNr; h += 16)
        for (int64_t q = 0; q < pairs; q += 16) {
          __m512i v[16];
          for (int j = 0; j < 16; ++j)
            v[j] = n + h + j < nc ? load_pairs(b.p, (n + h + j) * b.cs + 2 * q, b.bf16, K - 2 * q)
                                  : _mm512_setzero_si512();
          transpose16(v);
          for (int64_t j = 0; j < std::min<int64_t>(16, pairs - q); ++j) _mm512_store_si512(dst + (q + j) * kNr + h, v[j]);
        }
    }
  } else {
    for (int64_t n = 0; n < nc; n += kNr)
      for (int64_t q = 0; q < pairs; ++q)
        for (int64_t c = 0; c < kNr; ++c) {
          const bool in = n + c < nc;
          const u32 lo = in ? element(b, 2 * q, n + c) : 0, hi = in && 2 * q + 1 < K ? element(b, 2 * q + 1, n + c) : 0;
          Bp[(n / kNr) * pairs * kNr + q * kNr + c] = lo | (hi << 16);
        }
  }
}

struct Out {
  void* C;
  int64_t ldc;
  Bf16Out type;
  bool add;
  const float* bias;
};

// C's rows [0, R) x columns [0, nc) = A (R rows) @ Bp, one 32-column tile after the other. A's
// word for row i and pair q: Ap[q * kMr + i] as pack_a lays it out, or with kDirect
// Ap[i * a_row + q], the rows of a bf16 A read in place (a row's consecutive values are already
// its pairs).
template <int R, bool kDirect>
MD_BF16_TARGET void kernel(int64_t pairs, int64_t nc, const u32* __restrict Ap, int64_t a_row, const u32* __restrict Bp,
                           int64_t row0, int64_t col0, const Out& o) {
  for (int64_t j = 0; j < nc; j += kNr, Bp += pairs * kNr) {
    __m512 acc[R][2];
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t q = 0; q < pairs; ++q) {
      const __m512bh b0 = (__m512bh)_mm512_load_si512(Bp + q * kNr), b1 = (__m512bh)_mm512_load_si512(Bp + q * kNr + 16);
#pragma GCC unroll 14
      for (int i = 0; i < R; ++i) {
        u32 word;  // a bf16 A's pair read as bytes (its storage is 16-bit values)
        if constexpr (kDirect) std::memcpy(&word, reinterpret_cast<const char*>(Ap) + (i * a_row + q) * 4, 4);
        else word = Ap[q * kMr + i];
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
      }
    }
    const int64_t n = col0 + j;
    const __mmask16 m0 = low_lanes(nc - j), m1 = low_lanes(nc - j - 16);
    __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
    if (o.bias) {
      bias0 = _mm512_maskz_loadu_ps(m0, o.bias + n);
      bias1 = _mm512_maskz_loadu_ps(m1, o.bias + n + 16);
    }
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      __m512 c0 = _mm512_add_ps(acc[i][0], bias0), c1 = _mm512_add_ps(acc[i][1], bias1);
      const int64_t at = (row0 + i) * o.ldc + n;
      if (o.type == Bf16Out::kBf16) {
        u16* c = static_cast<u16*>(o.C) + at;
        _mm256_mask_storeu_epi16(c, m0, (__m256i)_mm512_cvtneps_pbh(c0));
        _mm256_mask_storeu_epi16(c + 16, m1, (__m256i)_mm512_cvtneps_pbh(c1));
      } else {
        float* c = static_cast<float*>(o.C) + at;
        if (o.type == Bf16Out::kFloatOfBf16) {  // rounded to bf16, widened back (bf16 is float32's top half)
          c0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(c0)), 16));
          c1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(c1)), 16));
        } else if (o.add) {
          c0 = _mm512_add_ps(c0, _mm512_maskz_loadu_ps(m0, c));
          c1 = _mm512_add_ps(c1, _mm512_maskz_loadu_ps(m1, c + 16));
        }
        _mm512_mask_storeu_ps(c, m0, c0);
        _mm512_mask_storeu_ps(c + 16, m1, c1);
      }
    }
  }
}

using KernelFn = void (*)(int64_t, int64_t, const u32*, int64_t, const u32*, int64_t, int64_t, const Out&);
template <bool kDirect>
constexpr KernelFn kKernels[kMr + 1] = {
    nullptr,                kernel<1, kDirect>,  kernel<2, kDirect>,  kernel<3, kDirect>,  kernel<4, kDirect>,
    kernel<5, kDirect>,     kernel<6, kDirect>,  kernel<7, kDirect>,  kernel<8, kDirect>,  kernel<9, kDirect>,
    kernel<10, kDirect>,    kernel<11, kDirect>, kernel<12, kDirect>, kernel<13, kDirect>, kernel<14, kDirect>};

}  // namespace

bool gemm_bf16_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return ok;
}

namespace {

// A bf16 A with rows contiguous in k is read in place: its rows' values are already the pairs
// (an even K, so no pair runs past a row's end, and 32-bit words at 4-byte boundaries).
bool reads_in_place(const AnyMatrix& a, int64_t K) {
  return a.bf16 && a.cs == 1 && a.rs % 2 == 0 && K % 2 == 0 && reinterpret_cast<uintptr_t>(a.p) % 4 == 0;
}

// The bias rounded to bf16, as the operands are (a buffer of the calling thread's), or null.
const float* rounded_bias(const float* bias, int64_t N) {
  if (!bias) return nullptr;
  thread_local std::vector<float> rounded;
  rounded.resize(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    const u32 bits = static_cast<u32>(float_to_bf16_bits(bias[n])) << 16;
    std::memcpy(&rounded[static_cast<size_t>(n)], &bits, 4);
  }
  return rounded.data();
}

// C's columns [n0, n0 + nc) = A (M x K) @ B's block Bp (pack_b's layout of those columns), A's
// panels of 14 rows one after the other (at::parallel_for runs on the calling thread: microdit
// is built without OpenMP; the CPU workers run whole products side by side).
void product_block(int64_t M, int64_t K, int64_t n0, int64_t nc, const AnyMatrix& a, const u32* Bp, const Out& o) {
  const int64_t pairs = (K + 1) / 2, panels = (M + kMr - 1) / kMr;
  const bool direct = reads_in_place(a, K);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    thread_local Buffer a_buffer;
    u32* Ap = direct ? nullptr : a_buffer.get(std::max<int64_t>(pairs, 1) * kMr);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = p * kMr, r = std::min(kMr, M - i);
      const char* rows = static_cast<const char*>(a.p) + i * a.rs * (a.bf16 ? 2 : 4);
      if (direct) {
        kKernels<true>[r](pairs, nc, reinterpret_cast<const u32*>(rows), a.rs / 2, Bp, i, n0, o);
      } else {
        pack_a(r, K, {rows, a.rs, a.cs, a.bf16}, Ap);
        kKernels<false>[r](pairs, nc, Ap, 0, Bp, i, n0, o);
      }
    }
  });
}

// Words of B's packed panels for columns [0, nc): whole panels of kNr columns, each `pairs` deep.
int64_t packed_words(int64_t K, int64_t nc) { return std::max<int64_t>((K + 1) / 2, 1) * ((nc + kNr - 1) / kNr) * kNr; }

}  // namespace

void gemm_bf16(int64_t M, int64_t N, int64_t K, const AnyMatrix& a, const AnyMatrix& b, void* C, Bf16Out out,
               int64_t ldc, bool accumulate, const float* bias) {
  if (M <= 0 || N <= 0) return;
  thread_local Buffer b_buffer;
  const Out o{C, ldc, out, accumulate && out == Bf16Out::kFloat, rounded_bias(bias, N)};
  for (int64_t n0 = 0; n0 < N; n0 += kNc) {
    const int64_t nc = std::min(kNc, N - n0);
    u32* Bp = b_buffer.get(packed_words(K, nc));
    pack_b(K, nc, {static_cast<const char*>(b.p) + n0 * b.cs * (b.bf16 ? 2 : 4), b.rs, b.cs, b.bf16}, Bp);
    product_block(M, K, n0, nc, a, Bp, o);
  }
}

PackedBf16 packed_bf16_storage(int64_t K, int64_t N) {
  PackedBf16 p;
  p.K = K;
  p.N = std::max<int64_t>(N, 0);
  if (p.N == 0) return p;
  // Column block n0 of gemm_bf16 is panels n0 / kNr onwards: all N columns' panels one after the
  // other lay the blocks out as gemm_bf16 would pack them one at a time.
  p.bytes = packed_bf16_bytes(K, p.N);
  p.words.reset(static_cast<uint32_t*>(std::aligned_alloc(64, static_cast<size_t>((p.bytes + 63) / 64 * 64))));
  if (!p.words) throw std::bad_alloc();
  return p;
}

int64_t packed_bf16_bytes(int64_t K, int64_t N) { return packed_words(K, N) * static_cast<int64_t>(sizeof(u32)); }

int64_t packed_bf16_panels(const PackedBf16& p) { return (p.N + kNr - 1) / kNr; }

void pack_bf16_panels(const AnyMatrix& b, PackedBf16& p, int64_t p0, int64_t p1) {
  p1 = std::min(p1, packed_bf16_panels(p));
  if (p0 >= p1) return;
  const int64_t n0 = p0 * kNr, nc = std::min(p1 * kNr, p.N) - n0, pairs = std::max<int64_t>((p.K + 1) / 2, 1);
  pack_b(p.K, nc, {static_cast<const char*>(b.p) + n0 * b.cs * (b.bf16 ? 2 : 4), b.rs, b.cs, b.bf16},
         p.words.get() + p0 * pairs * kNr);
}

PackedBf16 pack_bf16(int64_t K, int64_t N, const AnyMatrix& b) {
  auto p = packed_bf16_storage(K, N);
  pack_bf16_panels(b, p, 0, packed_bf16_panels(p));
  return p;
}

void gemm_bf16(int64_t M, const AnyMatrix& a, const PackedBf16& b, void* C, Bf16Out out, int64_t ldc, bool accumulate,
               const float* bias) {
  if (M <= 0 || b.N <= 0) return;
  const Out o{C, ldc, out, accumulate && out == Bf16Out::kFloat, rounded_bias(bias, b.N)};
  const int64_t pairs = std::max<int64_t>((b.K + 1) / 2, 1);
  for (int64_t n0 = 0; n0 < b.N; n0 += kNc)
    product_block(M, b.K, n0, std::min(kNc, b.N - n0), a, b.words.get() + (n0 / kNr) * pairs * kNr, o);
}

}  // namespace microdit::kernels::cpu
