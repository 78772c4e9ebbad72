// bf16 attention on CPUs with AVX512-BF16 and no AMX (kernels/attention_cpu.h): the float32
// kernels' passes (32 queries at a time, every product written out here by broadcasting one
// operand against the other's rows, everything of a block in L1) with each product in vdpbf16ps.
//
// vdpbf16ps adds to each float32 lane i the products of bf16 pair i of its two operands:
//   acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1]
// so a product C += A B broadcasts a pair of A's entries along the inner dimension (one 32-bit
// word: (A[r, n], A[r, n+1])) against a vector of B's pairs ((B[n, c], B[n+1, c]) in lane c),
// B "packed in pairs of rows". Which operand needs that packing depends on the product:
//   S^T = k q^T   (inner: the head width) k's rows are already pairs; q^T's are q's 32-bit words
//                 transposed (the float32 kernels' tile transpose moves them as floats);
//   dP^T = v dO^T likewise;
//   O = P v       (inner: keys) P^T rounded and packed in pairs of rows, v packed once a head;
//   dQ = dS k     likewise, k packed once a head;
//   dV += P^T dO  (inner: queries) P^T's rows rounded to bf16 are already pairs; dO packed per block;
//   dK += dS^T q  likewise, q packed per block.
// P and dS are rounded to bf16 for the products (as the AMX kernels and a GPU's flash kernels
// round them); scores, softmax and accumulation are float32. Padding (an odd key or query count)
// is zeros in the packed operands and in P's and dS's pairs.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/attention_cpu.h"
#include "kernels/attention_cpu_util.h"
#include "kernels/avx512_math.h"

namespace microdit::kernels::cpu {

using namespace attention_detail;

namespace {

using u32 = uint32_t;  // a pair of bf16 values, the first in the low half

MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) __m512bh as_pairs(__m512i x) { return (__m512bh)x; }

// The pair (p[0], p[1]) as one word.
inline __attribute__((always_inline)) u32 pair_at(const u16* p) {
  u32 w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// 16 floats rounded to bf16 (nearest even).
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) __m256i to_bf16(__m512 x) {
  return (__m256i)_mm512_cvtneps_pbh(x);
}

// Lane c = (a[c], b[c]): two rows of 16 bf16 values interleaved into 16 pairs.
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) __m512i interleave(__m256i a, __m256i b) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// out (ceil(rows / 2), cols) pairs = x (rows, cols; row stride ldx) in pairs of rows: out[r][c] =
// (x[2r][c], x[2r+1][c]), a missing last row zeros. cols is a multiple of 16.
MD_AVX512_BF16_TARGET void pack_row_pairs(const u16* x, int64_t ldx, int64_t rows, int64_t cols, u32* out) {
  for (int64_t r = 0; r < rows; r += 2) {
    const u16 *a = x + r * ldx, *b = a + ldx;
    const bool second = r + 1 < rows;
    u32* o = out + (r / 2) * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c));
      const __m256i vb = second ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c)) : _mm256_setzero_si256();
      _mm512_storeu_si512(o + c, interleave(va, vb));
    }
  }
}

// out (L, 32) bf16 = a block's float32 rows st (L, 32) rounded, lanes past the block's nq queries
// zero (their scores are not meant to be used). With st = P^T, row j's words are the pairs
// (P^T[j, 2i], P^T[j, 2i+1]) that dV = P^T dO broadcasts, and out packed in pairs of rows
// (pack_row_pairs) holds the pairs (P[i, 2j], P[i, 2j+1]) that O = P v broadcasts.
MD_AVX512_BF16_TARGET void round_rows(const float* st, int64_t L, int64_t nq, u16* out) {
  const __mmask16 m0 = lanes(nq), m1 = nq > 16 ? lanes(nq - 16) : (__mmask16)0;
  for (int64_t j = 0; j < L; ++j) {
    const __m512 lo = _mm512_maskz_loadu_ps(m0, st + j * kQueries);
    const __m512 hi = _mm512_maskz_loadu_ps(m1, st + j * kQueries + 16);
    _mm512_storeu_si512(out + j * kQueries, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // lo in lanes 0-15
  }
}

// Rows j0..j0+R of a block's S^T (L, 32): st[j] = sum_c k[j, c] q^T[c], by broadcasting the pairs
// of k's row against the block's pairs of q^T (qt: (hd / 2, 32) words). Raises the running maxima
// m0, m1 (lanes 0-15, 16-31) to the new scores.
template <int R, bool kMax>
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) void scores_bf16(const u16* k, int64_t ldk, const u32* qt,
                                                                             int64_t pairs, float* st, __m512& m0,
                                                                             __m512& m1) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < pairs; ++c) {
    const __m512bh b0 = as_pairs(_mm512_loadu_si512(qt + c * kQueries));
    const __m512bh b1 = as_pairs(_mm512_loadu_si512(qt + c * kQueries + 16));
    for (int r = 0; r < R; ++r) {
      const __m512bh x = as_pairs(_mm512_set1_epi32(static_cast<int>(pair_at(k + r * ldk + 2 * c))));
      a0[r] = _mm512_dpbf16_ps(a0[r], x, b0);
      a1[r] = _mm512_dpbf16_ps(a1[r], x, b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(st + r * kQueries, a0[r]);
    _mm512_storeu_ps(st + r * kQueries + 16, a1[r]);
    if (kMax) {
      m0 = _mm512_max_ps(m0, a0[r]);
      m1 = _mm512_max_ps(m1, a1[r]);
    }
  }
}

// All L rows of a block's S^T (L, 32) = k q^T: eight keys at a time, then the rest.
template <bool kMax>
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) void scores_block_bf16(const u16* k, int64_t ldk, int64_t L,
                                                                                   const u32* qt, int64_t pairs,
                                                                                   float* st, __m512& m0, __m512& m1) {
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) scores_bf16<8, kMax>(k + j * ldk, ldk, qt, pairs, st + j * kQueries, m0, m1);
  switch (L - j) {
#define MD_SCORES_TAIL(R) \
  case R: scores_bf16<R, kMax>(k + j * ldk, ldk, qt, pairs, st + j * kQueries, m0, m1); break;
    MD_SCORES_TAIL(1) MD_SCORES_TAIL(2) MD_SCORES_TAIL(3) MD_SCORES_TAIL(4) MD_SCORES_TAIL(5) MD_SCORES_TAIL(6)
    MD_SCORES_TAIL(7)
#undef MD_SCORES_TAIL
    default: break;
  }
}

// acc[r] += sum_{n < count} a[r ra + n na] . x[n] for R rows and V vectors of x's rows of pairs n
// (row stride ldx words, lanes as masks): each pair of a broadcast against a row of x's pairs.
template <int R, int V>
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) void broadcast_product(__m512 (&acc)[R][V], const u32* a,
                                                                                   int64_t ra, int64_t na, const u32* x,
                                                                                   int64_t ldx, int64_t count,
                                                                                   const __mmask16* masks) {
  for (int64_t n = 0; n < count; ++n) {
    __m512bh xn[V];
    for (int u = 0; u < V; ++u) xn[u] = as_pairs(_mm512_maskz_loadu_epi32(masks[u], x + n * ldx + 16 * u));
    for (int r = 0; r < R; ++r) {
      const __m512bh p = as_pairs(_mm512_set1_epi32(static_cast<int>(a[r * ra + n * na])));
      for (int u = 0; u < V; ++u) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], p, xn[u]);
    }
  }
}

// Vector masks of V vectors from column c0 of a head hd wide (a multiple of 16).
template <int V>
MD_AVX512_TARGET inline __attribute__((always_inline)) void width_masks(int64_t hd, int64_t c0, __mmask16 (&masks)[V]) {
  for (int u = 0; u < V; ++u) masks[u] = c0 + 16 * u < hd ? (__mmask16)0xFFFF : (__mmask16)0;
}

// Rows i0..i0+nq (nq <= Q) of O = P x (times inv[i] where given) for V vectors of the head width
// from x's column c0: pp (pairs, 32) the block's pairs of P along the keys, xp (pairs, hd) x
// packed in pairs of rows. Written as bf16 into the output's rows.
template <int Q, int V>
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) void output_bf16(const u32* xp, int64_t hd, int64_t pairs,
                                                                             const u32* pp, const float* inv,
                                                                             const __mmask16* masks, u16* out,
                                                                             int64_t ldo, int64_t nq) {
  __m512 acc[Q][V];
  for (int i = 0; i < Q; ++i)
    for (int u = 0; u < V; ++u) acc[i][u] = _mm512_setzero_ps();
  broadcast_product<Q, V>(acc, pp, 1, kQueries, xp, hd, pairs, masks);  // acc[i] += P[i, 2n..2n+1] . x[2n..2n+1]
  for (int i = 0; i < Q && i < nq; ++i) {
    const __m512 s = _mm512_set1_ps(inv ? inv[i] : 1.0f);
    for (int u = 0; u < V; ++u)
      _mm256_mask_storeu_epi16(out + i * ldo + 16 * u, masks[u], to_bf16(_mm512_mul_ps(acc[i][u], s)));
  }
}

// All rows of O for one query block, in column chunks of V vectors and row groups of Q.
template <int Q, int V>
MD_AVX512_BF16_TARGET void output_block_bf16(const u32* xp, int64_t hd, int64_t pairs, const u32* pp,
                                             const float* inv, u16* out, int64_t ldo, int64_t nq) {
  for (int64_t c0 = 0; c0 < hd; c0 += 16 * V) {
    __mmask16 masks[V];
    width_masks<V>(hd, c0, masks);
    for (int64_t i = 0; i < nq; i += Q)
      output_bf16<Q, V>(xp + c0, hd, pairs, pp + i, inv ? inv + i : nullptr, masks, out + i * ldo + c0, ldo, nq - i);
  }
}

// Rows j..j+R of acc (row stride hd) += R^T x over a block's queries, V vectors of the width from
// column c0: a the rows' pairs along the queries (16 words a row), xp (pairs, hd) the block's x
// packed in pairs of rows, both offset to the rows and column. first: acc starts at zero instead.
template <int R, int V>
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) void accumulate_bf16(const u32* a, const u32* xp,
                                                                                 int64_t hd, int64_t pairs,
                                                                                 const __mmask16* masks, float* acc,
                                                                                 bool first) {
  __m512 s[R][V];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < V; ++u)
      s[r][u] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[u], acc + r * hd + 16 * u);
  broadcast_product<R, V>(s, a, kQueries / 2, 1, xp, hd, pairs, masks);  // s[r] += R^T[r, 2n..2n+1] . x[2n..2n+1]
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < V; ++u) _mm512_mask_storeu_ps(acc + r * hd + 16 * u, masks[u], s[r][u]);
}

// All L rows of acc (L, hd) float32 += R^T x over a block's queries: rows (L, 32) bf16 (R^T's
// rows, pairs along the queries), xp (pairs, hd) the block's x packed in pairs of rows.
template <int R, int V>
MD_AVX512_BF16_TARGET void accumulate_block_bf16(const u16* rows, int64_t L, const u32* xp, int64_t hd, int64_t pairs,
                                                 float* acc, bool first) {
  const u32* a = reinterpret_cast<const u32*>(rows);  // row j: 16 pairs at a + 16 j
  for (int64_t c0 = 0; c0 < hd; c0 += 16 * V) {
    __mmask16 masks[V];
    width_masks<V>(hd, c0, masks);
    int64_t j = 0;
    for (; j + R <= L; j += R)
      accumulate_bf16<R, V>(a + j * kQueries / 2, xp + c0, hd, pairs, masks, acc + j * hd + c0, first);
    for (; j < L; ++j) accumulate_bf16<1, V>(a + j * kQueries / 2, xp + c0, hd, pairs, masks, acc + j * hd + c0, first);
  }
}

struct ForwardArgs {
  Operand q, k, v;
  u16* out;    // (B, N, H, hd)
  float* lse;  // (B, H, N)
  int64_t H, N, L, hd;
  float scale;
};

struct ForwardScratch {
  // Zeroed once: lanes of q^T past the last query keep finite values, so do their scores.
  std::vector<u32> qt, vp, pp;  // q^T's pairs (hd / 2, 32); v packed (ceil(L / 2), hd); P's pairs (ceil(L / 2), 32)
  std::vector<u16> pt;          // P^T rounded (L, 32)
  std::vector<float> st;        // S^T, then P^T (L, 32)
  alignas(64) float inv[kQueries];
  ForwardScratch(int64_t L, int64_t hd)
      : qt(hd / 2 * kQueries, 0), vp((L + 1) / 2 * hd), pp((L + 1) / 2 * kQueries), pt(L * kQueries),
        st(L * kQueries) {}
};

// Head (b, h) of the forward pass, as forward_head_f32 (kernels/attention_cpu.cpp) with pairs:
// v packed once; per block of 32 queries q^T's pairs, S^T = k q^T with the maxima, P^T =
// exp(scale S^T - scale m) and its sums, P's pairs, O = P v / l into the output's rows.
MD_AVX512_BF16_TARGET void forward_head(const ForwardArgs& a, ForwardScratch& x, int64_t b, int64_t h) {
  const int64_t N = a.N, L = a.L, hd = a.hd, ldo = a.H * hd, pairs_k = (L + 1) / 2, nvec = hd / 16;
  const u16* k = a.k.row(b, h, 0);
  u32 *qt = x.qt.data(), *vp = x.vp.data(), *pp = x.pp.data();
  float* st = x.st.data();
  pack_row_pairs(a.v.row(b, h, 0), a.v.s2, L, hd, vp);
  for (int64_t i0 = 0; i0 < N; i0 += kQueries) {
    const int64_t nq = std::min(kQueries, N - i0);
    // q^T's pairs (hd / 2, 32): q's rows of words transposed (with_even_rows made s2 even).
    transpose_f32(reinterpret_cast<const float*>(a.q.row(b, h, i0)), nq, hd / 2, a.q.s2 / 2,
                  reinterpret_cast<float*>(qt), kQueries);
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    scores_block_bf16<true>(k, a.k.s2, L, qt, hd / 2, st, m0, m1);  // S^T (L, 32)
    softmax_block_forward(st, L, a.scale, m0, m1, x.inv, a.lse ? a.lse + (b * a.H + h) * N + i0 : nullptr, nq);
    round_rows(st, L, nq, x.pt.data());                  // P^T (L, 32) bf16
    pack_row_pairs(x.pt.data(), kQueries, L, kQueries, pp);  // P's pairs along the keys (ceil(L / 2), 32)
    u16* out = a.out + ((b * N + i0) * a.H + h) * hd;
#define MD_FORWARD_OUTPUT(Q, V) output_block_bf16<Q, V>(vp, hd, pairs_k, pp, x.inv, out, ldo, nq)
    MD_BY_WIDTH(nvec, MD_FORWARD_OUTPUT);
#undef MD_FORWARD_OUTPUT
  }
}

struct Args {
  Operand q, k, v, out, dout;
  const float* lse;
  int64_t lse_s0, lse_s1, lse_s2;
  u16 *dq, *dk, *dv;  // (B, seq, H, hd)
  int64_t H, N, L, hd;
  float scale;
};

struct Scratch {
  // Zeroed once, as in the forward pass: lanes past the last query stay finite.
  std::vector<u32> qt, gt;       // q^T's and dO^T's pairs (hd / 2, 32)
  std::vector<u32> qp, gp;       // the block's q and dO packed in pairs of rows (16, hd)
  std::vector<u32> kp, dsp;      // k packed (ceil(L / 2), hd); dS's pairs along the keys (ceil(L / 2), 32)
  std::vector<u16> pt, dst;      // P^T and scale dS^T rounded (L, 32), lanes past the block's queries zero
  std::vector<float> st, dpt;    // S^T then P^T, dP^T then scale dS^T (L, 32)
  std::vector<float> dk, dv;     // the head's dK, dV (L, hd), summed over the blocks
  alignas(64) float d[kQueries], lse[kQueries];
  Scratch(int64_t L, int64_t hd)
      : qt(hd / 2 * kQueries, 0), gt(hd / 2 * kQueries, 0), qp(kQueries / 2 * hd), gp(kQueries / 2 * hd),
        kp((L + 1) / 2 * hd), dsp((L + 1) / 2 * kQueries), pt(L * kQueries), dst(L * kQueries),
        st(L * kQueries), dpt(L * kQueries), dk(L * hd), dv(L * hd) {}
};

// The gradients of head (b, h), as backward_head_f32 (kernels/attention_cpu.cpp) with pairs: k
// packed once; per block of 32 queries q^T's and dO^T's pairs, q and dO packed, D = rowsum(dO o
// O), S^T = k q^T and dP^T = v dO^T, P^T and scale dS^T, then dV += P^T dO, dK += scale dS^T q
// (float32, in the scratch) and dQ = scale dS k (into its output's rows). dK and dV are rounded
// into their outputs' rows at the end.
MD_AVX512_BF16_TARGET void backward_head(const Args& a, Scratch& x, int64_t b, int64_t h) {
  const int64_t N = a.N, L = a.L, hd = a.hd, ldo = a.H * hd, nvec = hd / 16, pairs_k = (L + 1) / 2;
  const u16 *k = a.k.row(b, h, 0), *v = a.v.row(b, h, 0);
  u32 *qt = x.qt.data(), *gt = x.gt.data(), *qp = x.qp.data(), *gp = x.gp.data(), *kp = x.kp.data(),
      *dsp = x.dsp.data();
  float *st = x.st.data(), *dpt = x.dpt.data();
  pack_row_pairs(k, a.k.s2, L, hd, kp);
  for (int64_t i0 = 0; i0 < N; i0 += kQueries) {
    const int64_t nq = std::min(kQueries, N - i0), pairs_q = (nq + 1) / 2;
    const u16 *q = a.q.row(b, h, i0), *g = a.dout.row(b, h, i0);
    for (int64_t i = 0; i < nq; ++i) {
      x.d[i] = dot_bf16(g + i * a.dout.s2, a.out.row(b, h, i0 + i), hd);
      x.lse[i] = a.lse[b * a.lse_s0 + h * a.lse_s1 + (i0 + i) * a.lse_s2];
    }
    for (int64_t i = nq; i < kQueries; ++i) x.d[i] = x.lse[i] = 0.0f;  // finite lanes past the end
    transpose_f32(reinterpret_cast<const float*>(q), nq, hd / 2, a.q.s2 / 2, reinterpret_cast<float*>(qt), kQueries);
    transpose_f32(reinterpret_cast<const float*>(g), nq, hd / 2, a.dout.s2 / 2, reinterpret_cast<float*>(gt),
                  kQueries);
    pack_row_pairs(q, a.q.s2, nq, hd, qp);
    pack_row_pairs(g, a.dout.s2, nq, hd, gp);
    __m512 unused0, unused1;
    scores_block_bf16<false>(k, a.k.s2, L, qt, hd / 2, st, unused0, unused1);   // S^T  (L, 32)
    scores_block_bf16<false>(v, a.v.s2, L, gt, hd / 2, dpt, unused0, unused1);  // dP^T (L, 32)
    softmax_block_backward(st, dpt, L, a.scale, x.lse, x.d);  // P^T, scale dS^T
    round_rows(st, L, nq, x.pt.data());    // P^T  (L, 32) bf16
    round_rows(dpt, L, nq, x.dst.data());  // scale dS^T (L, 32) bf16
    pack_row_pairs(x.dst.data(), kQueries, L, kQueries, dsp);  // scale dS's pairs along the keys
    const bool first = i0 == 0;
    u16* dq = a.dq + ((b * N + i0) * a.H + h) * hd;
#define MD_BACKWARD_PRODUCTS(R, V)                                                                    \
  accumulate_block_bf16<R, V>(x.pt.data(), L, gp, hd, pairs_q, x.dv.data(), first);  /* dV (L, hd) */ \
  accumulate_block_bf16<R, V>(x.dst.data(), L, qp, hd, pairs_q, x.dk.data(), first); /* dK (L, hd) */ \
  output_block_bf16<R, V>(kp, hd, pairs_k, dsp, nullptr, dq, ldo, nq)                /* dQ (nq, hd) */
    MD_BY_WIDTH(nvec, MD_BACKWARD_PRODUCTS);
#undef MD_BACKWARD_PRODUCTS
  }
  for (int64_t j = 0; j < L; ++j) {
    u16 *ok = a.dk + ((b * L + j) * a.H + h) * hd, *ov = a.dv + ((b * L + j) * a.H + h) * hd;
    for (int64_t c = 0; c < hd; c += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ok + c), to_bf16(_mm512_loadu_ps(&x.dk[j * hd + c])));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ov + c), to_bf16(_mm512_loadu_ps(&x.dv[j * hd + c])));
    }
  }
}

// The kernels transpose q's and dO's rows as 32-bit words (q^T's pairs): their strides must be
// even and their rows start at even addresses. A tensor that breaks that is copied (only odd
// views do). k, v and out are read by rows, pairs wherever they start, and need no copy.
at::Tensor with_even_rows(const at::Tensor& t) {
  const bool even = t.stride(0) % 2 == 0 && t.stride(1) % 2 == 0 && t.stride(2) % 2 == 0 &&
                    reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0;
  return even ? t : t.contiguous();
}

void check_cpu() {
  check(avx512_bf16_attention_available(), at::kBFloat16, "this CPU has neither AMX nor AVX512-BF16 for bf16");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_bf16_avx512(const at::Tensor& q_in, const at::Tensor& k,
                                                                 const at::Tensor& v, double scale, bool with_lse) {
  check_cpu();
  check_inputs(q_in, k, v, at::kBFloat16);
  check(scale > 0, at::kBFloat16, "scale must be positive");
  const at::Tensor q = with_even_rows(q_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), hd = q.size(3);
  at::Tensor out = at::empty({B, N, H, hd}, q.options().memory_format(c10::MemoryFormat::Contiguous));
  at::Tensor lse;
  if (with_lse) lse = at::empty({B, H, N}, q.options().dtype(at::kFloat).memory_format(c10::MemoryFormat::Contiguous));
  const ForwardArgs args{operand(q), operand(k), operand(v), reinterpret_cast<u16*>(out.data_ptr()),
                         with_lse ? lse.data_ptr<float>() : nullptr, H, N, L, hd, static_cast<float>(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    ForwardScratch x(L, hd);
    for (int64_t w = w0; w < w1; ++w) forward_head(args, x, w / H, w % H);
  });
  return {out.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_bf16_avx512(
    const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& dout_in, double scale) {
  check_cpu();
  check_inputs(q_in, k, v, at::kBFloat16);
  check_backward_inputs(q_in, out, lse, dout_in, at::kBFloat16);
  const at::Tensor q = with_even_rows(q_in), dout = with_even_rows(dout_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), hd = q.size(3);
  const auto opts = q.options().memory_format(c10::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty({B, N, H, hd}, opts), dk = at::empty({B, L, H, hd}, opts),
             dv = at::empty({B, L, H, hd}, opts);  // (B, seq, H, hd)
  const Args args{operand(q), operand(k), operand(v), operand(out), operand(dout),
                  lse.data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2),
                  reinterpret_cast<u16*>(dq.data_ptr()), reinterpret_cast<u16*>(dk.data_ptr()),
                  reinterpret_cast<u16*>(dv.data_ptr()), H, N, L, hd, static_cast<float>(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    Scratch x(L, hd);
    for (int64_t w = w0; w < w1; ++w) backward_head(args, x, w / H, w % H);
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

}  // namespace microdit::kernels::cpu
