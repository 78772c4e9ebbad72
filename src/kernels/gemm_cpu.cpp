// float32 products for AVX-512 CPUs (kernels/gemm_cpu.h).
//
// Loops, outermost first:
//   K in blocks of kKc rows, N in blocks of kNc columns: B's block is packed into panels of
//     kNr columns, each panel kc x 32 floats (32 KB, stays in L1 while A's panels pass by);
//   A in panels of kMr rows (at::parallel_for: one thread, as microdit has no OpenMP): packed k-major
//     (kMr floats per k, or 16 with padding, so the kernel broadcasts consecutive floats), and
//     the rows of the next panel are prefetched during the first kernels that use this one;
//   B's panels: one 14 x 32 kernel each, C's tile written (or added to) once per K block.
// Packing transposes where an operand's rows are contiguous in K (x and dY in a linear layer's
// product and input gradient), 16 x 16 floats at a time in registers, and copies otherwise.
#include "kernels/gemm_cpu.h"
#include "kernels/gemm_cpu_util.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include "kernels/avx512_math.h"

#include <algorithm>
#include <cmath>

namespace microdit::kernels::cpu {

namespace {

#define MD_GEMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,prfchw")))
#define MD_GEMM_INLINE inline __attribute__((always_inline))

constexpr int64_t kMr = 14;    // rows of A per panel: 28 accumulators + 2 of B's vectors
// Floats per k in A's packed panel: kMr where the packing transposes (a panel of 768 rows of K
// then stays within L1: 43 KB; padded, those products lost 5 %), else padded to 16 so that the
// copies store whole aligned vectors (weight gradients +3 %).
constexpr int64_t kAsT = kMr, kAs = 16;
constexpr int64_t kNr = 32;    // columns of B per panel: two vectors
constexpr int64_t kKc = 256;   // rows of K per block: A's panel 14 KB, B's panel 32 KB
constexpr int64_t kKcT = 768;  // the same where A is transposed into its panels: fewer passes over C
constexpr int64_t kNc = 1024;  // columns per packed block of B: at most 1 MB

using Buffer = gemm_detail::AlignedBuffer<float>;
using gemm_detail::low_lanes;

// Where the kernels prefetch the next panel's (or block's) source of A while they run, one
// cache line per k: `rows` rows of `lines` lines each, `stride` bytes apart, in order. The
// kernels carry the position on, so one sweep can span several kernel calls.
struct Prefetch {
  const char* row = nullptr;
  int64_t stride = 0, lines = 0, line = 0, rows = 0;
};

// C (R x nc) (+)= Ap (k-major, AS per k) @ Bp (nc / 32 panels of 32 per k), one 32-column
// tile after the other (masks for a partial last one); `pf` spread over the first tiles' k.
// `dg`: C's values are multiplied by GELU'(dg[i * ldg + j]) last; `gelu`: C's values go through
// GELU last.
template <int R, int AS>
MD_GEMM_TARGET void kernel(int64_t K, int64_t nc, const float* __restrict Ap, const float* __restrict Bp, float* C,
                           int64_t ldc, bool add, bool gelu, const float* bias, const float* dg, int64_t ldg,
                           Prefetch& pf) {
  const char* pf_row = pf.row;
  int64_t pf_line = pf.line, pf_rows = pf.rows;
  for (int64_t j = 0; j < nc; j += kNr, Bp += K * kNr) {
    const __mmask16 m0 = low_lanes(nc - j), m1 = low_lanes(nc - j - 16);
    // The next tile's lines of C (and of dg): this panel's next 32 columns, or after the last
    // tile the first 32 columns of the next panel's rows (the next call's first tile). Written
    // with write intent, one line per k over the first k, so that the stores below find them.
    const int64_t next = j + kNr < nc ? j + kNr : R * ldc;
    const char* c_next = reinterpret_cast<const char*>(C + next);
    const char* g_next = dg ? reinterpret_cast<const char*>(dg + (j + kNr < nc ? j + kNr : R * ldg)) : nullptr;
    __m512 acc[R][2];
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      if (k < 2 * R) {
        __builtin_prefetch(c_next + (k >> 1) * ldc * 4 + (k & 1) * 64, 1, 3);
        if (g_next) __builtin_prefetch(g_next + (k >> 1) * ldg * 4 + (k & 1) * 64, 0, 3);
      }
      if (pf_rows > 0) {
        _mm_prefetch(pf_row + pf_line * 64, _MM_HINT_T0);
        if (++pf_line == pf.lines) {
          pf_line = 0;
          pf_row += pf.stride;
          --pf_rows;
        }
      }
      const __m512 b0 = _mm512_load_ps(Bp + k * kNr), b1 = _mm512_load_ps(Bp + k * kNr + 16);
#pragma GCC unroll 14
      for (int i = 0; i < R; ++i) {
        const __m512 a = _mm512_set1_ps(Ap[k * AS + i]);
        acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
      }
    }
    __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
    if (bias) {
      bias0 = _mm512_maskz_loadu_ps(m0, bias + j);
      bias1 = _mm512_maskz_loadu_ps(m1, bias + j + 16);
    }
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      float* c = C + i * ldc + j;
      __m512 c0 = _mm512_add_ps(acc[i][0], bias0), c1 = _mm512_add_ps(acc[i][1], bias1);
      if (add) {
        c0 = _mm512_add_ps(c0, _mm512_maskz_loadu_ps(m0, c));
        c1 = _mm512_add_ps(c1, _mm512_maskz_loadu_ps(m1, c + 16));
      }
      if (dg) {
        const float* x = dg + i * ldg + j;
        c0 = _mm512_mul_ps(c0, gelu_grad16(_mm512_maskz_loadu_ps(m0, x)));
        c1 = _mm512_mul_ps(c1, gelu_grad16(_mm512_maskz_loadu_ps(m1, x + 16)));
      }
      if (gelu) {
        c0 = gelu16(c0);
        c1 = gelu16(c1);
      }
      _mm512_mask_storeu_ps(c, m0, c0);
      _mm512_mask_storeu_ps(c + 16, m1, c1);
    }
  }
  pf.row = pf_row;
  pf.line = pf_line;
  pf.rows = pf_rows;
}

using KernelFn = void (*)(int64_t, int64_t, const float*, const float*, float*, int64_t, bool, bool, const float*,
                          const float*, int64_t, Prefetch&);
template <int AS>
constexpr KernelFn kKernels[kMr + 1] = {nullptr,           kernel<1, AS>,  kernel<2, AS>,  kernel<3, AS>,
                                        kernel<4, AS>,     kernel<5, AS>,  kernel<6, AS>,  kernel<7, AS>,
                                        kernel<8, AS>,     kernel<9, AS>,  kernel<10, AS>, kernel<11, AS>,
                                        kernel<12, AS>,    kernel<13, AS>, kernel<14, AS>};

// 16 x 16 floats transposed in registers: r[i] lane j <- r[j] lane i.
MD_GEMM_TARGET MD_GEMM_INLINE void transpose16(__m512 (&r)[16]) {
  __m512i w[16];
  for (int i = 0; i < 16; ++i) w[i] = _mm512_castps_si512(r[i]);
  gemm_detail::transpose16(w);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(w[i]);
}

// Whether pack_a transposes A (its rows run along K), which also sets its panels' floats per k
// (kAsT, else kAs): the kernel run_panels picks must agree.
MD_GEMM_INLINE bool transposed_pack(const StridedMatrix& a) { return a.cs == 1; }

// A's values as packed: GELU(v) with kGelu, else v.
template <bool kGelu>
MD_GEMM_TARGET MD_GEMM_INLINE __m512 prologue(__m512 v) {
  if constexpr (kGelu) return gelu16(v);
  return v;
}

// Ap[k * as + i] = A(i, k) (through the prologue) for i < r (r <= kMr), k < kc, with as = kAsT
// where A's rows are contiguous in k, else kAs (zeros up to it).
template <bool kGelu>
MD_GEMM_TARGET void pack_a(int64_t r, int64_t kc, StridedMatrix a, float* Ap) {
  const __mmask16 rows = low_lanes(r);
  if (transposed_pack(a)) {  // rows contiguous in k: transpose 16 k at a time
    for (int64_t k = 0; k < kc; k += 16) {
      const int64_t w = std::min<int64_t>(16, kc - k);
      const __mmask16 cols = low_lanes(w);
      __m512 v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = i < r ? prologue<kGelu>(_mm512_maskz_loadu_ps(cols, a.p + i * a.rs + k)) : _mm512_setzero_ps();
      transpose16(v);
      for (int j = 0; j < w; ++j) _mm512_mask_storeu_ps(Ap + (k + j) * kAsT, rows, v[j]);
    }
  } else if (a.rs == 1) {  // columns contiguous in m: a copy per k
    for (int64_t k = 0; k < kc; ++k)
      _mm512_store_ps(Ap + k * kAs, prologue<kGelu>(_mm512_maskz_loadu_ps(rows, a.p + k * a.cs)));
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t i = 0; i < kAs; ++i) Ap[k * kAs + i] = i < r ? a.p[i * a.rs + k * a.cs] : 0.0f;
      if constexpr (kGelu) _mm512_store_ps(Ap + k * kAs, gelu16(_mm512_load_ps(Ap + k * kAs)));
    }
  }
}

// Rows [m0, m1) of A, contiguous in m (rs == 1), into consecutive panels of kMr rows as pack_a
// lays them out (panel q at Ap + q * kAs * kc): each row k of the block read once.
template <bool kGelu>
MD_GEMM_TARGET void pack_a_block(int64_t m0, int64_t m1, int64_t kc, StridedMatrix a, float* Ap) {
  for (int64_t k = 0; k < kc; ++k) {
    const float* src = a.p + k * a.cs;
    for (int64_t i = m0, q = 0; i < m1; i += kMr, ++q) {
      const __mmask16 rows = low_lanes(std::min(kMr, m1 - i));
      _mm512_store_ps(Ap + (q * kc + k) * kAs, prologue<kGelu>(_mm512_maskz_loadu_ps(rows, src + i)));
    }
  }
}

// Bp[(j / kNr) * kc * kNr + k * kNr + j % kNr] = B(k, j) for j < nc, zero up to the panel's end.
MD_GEMM_TARGET void pack_b(int64_t kc, int64_t nc, StridedMatrix b, float* Bp) {
  if (b.cs == 1) {  // rows contiguous in n: row by row, each row's pieces to every panel (reading
                    // along the rows keeps the hardware prefetchers ahead; panel by panel would
                    // read 128 bytes of each row, rows apart, and miss on every one)
    const int64_t full = nc / kNr * kNr;
    const __mmask16 m0 = low_lanes(nc - full), m1 = low_lanes(nc - full - 16);
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = b.p + k * b.rs;
      float* dst = Bp + k * kNr;
      int64_t n0 = 0;
      for (; n0 < full; n0 += kNr, dst += kc * kNr) {
        _mm512_store_ps(dst, _mm512_loadu_ps(src + n0));
        _mm512_store_ps(dst + 16, _mm512_loadu_ps(src + n0 + 16));
      }
      if (n0 < nc) {
        _mm512_store_ps(dst, _mm512_maskz_loadu_ps(m0, src + n0));
        _mm512_store_ps(dst + 16, _mm512_maskz_loadu_ps(m1, src + n0 + 16));
      }
    }
    return;
  }
  for (int64_t n0 = 0; n0 < nc; n0 += kNr) {
    const int64_t w = std::min(kNr, nc - n0);
    float* dst = Bp + n0 * kc;
    if (b.rs == 1) {  // columns contiguous in k (a weight W[n, k] as W^T): transpose
      for (int64_t k = 0; k < kc; k += 16) {
        const int64_t h = std::min<int64_t>(16, kc - k);
        const __mmask16 ks = low_lanes(h);
        for (int64_t half = 0; half < 2; ++half) {
          __m512 v[16];
          for (int j = 0; j < 16; ++j) {
            const int64_t col = half * 16 + j;
            v[j] = col < w ? _mm512_maskz_loadu_ps(ks, b.p + (n0 + col) * b.cs + k) : _mm512_setzero_ps();
          }
          transpose16(v);
          for (int64_t q = 0; q < h; ++q) _mm512_store_ps(dst + (k + q) * kNr + half * 16, v[q]);
        }
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < kNr; ++j) dst[k * kNr + j] = j < w ? b.p[k * b.rs + (n0 + j) * b.cs] : 0.0f;
    }
  }
}

// A's panels [i0, i1) (kMr rows each) against B's packed block. Where A's columns are
// contiguous (rs == 1), kBlockPanels panels are packed at once, so that each row of A's block
// is read once (a panel's 14 floats share cache lines with its neighbours'); otherwise one
// panel at a time, the next one's rows prefetched while the kernel runs.
constexpr int64_t kBlockPanels = 8;

// `dg` (row stride ldg): as in the kernels, or null; `gelu`: as in the kernels.
struct Epilogue {
  const float* bias;
  const float* dg;
  int64_t ldg;
  bool gelu;
};

template <bool kGelu>
void run_panels(int64_t i0, int64_t i1, int64_t M, int64_t nc, int64_t kc, StridedMatrix a, const float* Bp,
                float* C, int64_t ldc, bool add, const Epilogue& e) {
  thread_local Buffer a_buffer;
  if (a.rs == 1 && a.cs != 1) {
    float* Ap = a_buffer.get(kBlockPanels * kAs * kc);
    for (int64_t p0 = i0; p0 < i1; p0 += kBlockPanels) {
      const int64_t p1 = std::min(i1, p0 + kBlockPanels), p2 = std::min(i1, p1 + kBlockPanels);
      pack_a_block<kGelu>(p0 * kMr, std::min(M, p1 * kMr), kc, a, Ap);
      Prefetch pf;  // the next block's rows of A: kc rows of its columns
      if (p2 > p1) {
        const int64_t first = p1 * kMr, last = std::min(M, p2 * kMr);
        pf.row = reinterpret_cast<const char*>(a.p + first);
        pf.stride = a.cs * 4;
        pf.lines = (last - first + 15) / 16 + 1;  // the columns may straddle one more line
        pf.rows = kc;
      }
      for (int64_t panel = p0; panel < p1; ++panel) {
        const int64_t i = panel * kMr, r = std::min(kMr, M - i);
        kKernels<kAs>[r](kc, nc, Ap + (panel - p0) * kAs * kc, Bp, C + i * ldc, ldc, add, e.gelu, e.bias,
                    e.dg ? e.dg + i * e.ldg : nullptr, e.ldg, pf);
      }
    }
    return;
  }
  float* Ap = a_buffer.get(kAs * kc);
  for (int64_t panel = i0; panel < i1; ++panel) {
    const int64_t i = panel * kMr, r = std::min(kMr, M - i);
    pack_a<kGelu>(r, kc, {a.p + i * a.rs, a.rs, a.cs}, Ap);
    Prefetch pf;  // the next panel's rows of A
    if (panel + 1 < i1 && transposed_pack(a)) {
      pf.row = reinterpret_cast<const char*>(a.p + (i + kMr) * a.rs);
      pf.stride = a.rs * 4;
      pf.lines = (kc + 15) / 16 + 1;
      pf.rows = std::min(kMr, M - i - kMr);
    }
    (transposed_pack(a) ? kKernels<kAsT> : kKernels<kAs>)[r](kc, nc, Ap, Bp, C + i * ldc, ldc, add, e.gelu, e.bias,
                                                    e.dg ? e.dg + i * e.ldg : nullptr, e.ldg, pf);
  }
}

// GELU'(x) and GELU(x) for one float (the K = 0 corner only).
float gelu_grad(float x) {
  const double cdf = 0.5 * (1.0 + std::erf(x * 0.70710678118654752));
  return static_cast<float>(cdf + x * std::exp(-0.5 * x * x) * 0.39894228040143268);
}
float gelu(float x) { return static_cast<float>(0.5 * x * (1.0 + std::erf(x * 0.70710678118654752))); }

}  // namespace

bool gemm_f32_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return ok;
}

void gemm_f32(int64_t M, int64_t N, int64_t K, StridedMatrix a, StridedMatrix b, float* C, int64_t ldc,
              bool accumulate, const float* bias, const GemmExtras& extras) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {  // no products: C = ((C +) bias) * GELU'(X), or GELU((C +) bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float c = (accumulate ? C[m * ldc + n] : 0.0f) + (bias ? bias[n] : 0.0f);
        if (extras.gelu_grad_at) c *= gelu_grad(extras.gelu_grad_at[m * extras.ld_gelu_grad + n]);
        if (extras.gelu_out) c = gelu(c);
        C[m * ldc + n] = c;
      }
    return;
  }
  thread_local Buffer b_buffer;
  const int64_t panels = (M + kMr - 1) / kMr;
  const int64_t block_k = a.cs == 1 && a.rs != 1 ? kKcT : kKc;
  for (int64_t k0 = 0; k0 < K; k0 += block_k) {
    const int64_t kc = std::min(block_k, K - k0);
    const bool add = accumulate || k0 > 0, last = k0 + kc == K;
    const StridedMatrix ak{a.p + k0 * a.cs, a.rs, a.cs};
    for (int64_t n0 = 0; n0 < N; n0 += kNc) {
      const int64_t nc = std::min(kNc, N - n0);
      float* Bp = b_buffer.get(kc * ((nc + kNr - 1) / kNr) * kNr);
      pack_b(kc, nc, {b.p + k0 * b.rs + n0 * b.cs, b.rs, b.cs}, Bp);
      const Epilogue e{bias && k0 == 0 ? bias + n0 : nullptr,
                       extras.gelu_grad_at && last ? extras.gelu_grad_at + n0 : nullptr, extras.ld_gelu_grad,
                       extras.gelu_out && last};
      at::parallel_for(0, panels, 1, [&](int64_t i0, int64_t i1) {
        if (extras.gelu_a)
          run_panels<true>(i0, i1, M, nc, kc, ak, Bp, C + n0, ldc, add, e);
        else
          run_panels<false>(i0, i1, M, nc, kc, ak, Bp, C + n0, ldc, add, e);
      });
    }
  }
}

}  // namespace microdit::kernels::cpu
