// bf16 attention on AMX (kernels/attention_cpu.h), both passes. One (batch, head) at a time: the
// products run through oneDNN's brgemm (ATen's at::native::cpublas, the entry point of ATen's own
// AMX attention forward) on q, k, v and dO where they lie (copied, with a zero row, only where
// brgemm's even inner dimension needs it; the transposed operands into padded buffers), and one
// AVX-512 pass over the scores turns S into P (forward), or S and dP into P and dS (backward).
// float32 attention (the second half) makes no library call.
#include "kernels/attention_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/attention_cpu_util.h"
#include "kernels/avx512_math.h"
#include "kernels/cpu_math.h"

namespace microdit::kernels::cpu {

using namespace attention_detail;

namespace {

namespace cb = at::native::cpublas;

// brgemm takes B packed in the VNNI layout in blocks of 16, 32, 48 or 64 columns, and an even
// inner dimension K (VNNI pairs); the buffers below are padded with zeros to fit.
constexpr int64_t kColumnBlock = 64;
int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C (M x N, row stride ldc) = A (M x K, row stride lda) @ B (K x N, row stride ldb): bf16 in,
// float32 accumulated and stored. K even, N a multiple of 16; `packed` holds K * 64 values.
void gemm(int64_t M, int64_t N, int64_t K, const u16* A, int64_t lda, const u16* B, int64_t ldb, float* C,
          int64_t ldc, u16* packed) {
  const auto* a = reinterpret_cast<const at::BFloat16*>(A);
  const auto* p = reinterpret_cast<const at::BFloat16*>(packed);
  for (int64_t n0 = 0; n0 < N; n0 += kColumnBlock) {
    const int64_t nb = std::min(kColumnBlock, N - n0);
    cb::pack(K, nb, ldb, nb, at::kBFloat16, at::kBFloat16, B + n0, packed);
    cb::brgemm(M, nb, K, lda, nb, ldc, /*add_C=*/false, a, p, C + n0, /*is_vnni=*/true);
  }
}


// Stores the first lanes (mask) of v rounded to bf16 (nearest even).
MD_AVX512_BF16_TARGET inline __attribute__((always_inline)) void store_bf16(u16* dst, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(dst, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// One (batch, head)'s softmax of the (N, Lc) scores S, rows i < N (columns past L are padding
// and get zeros): m = scale max_j s, p = exp(scale s - m), P = bf16(p), l[i] = sum_j p, and
// lse[i] = m + log(l[i]) for the backward pass.
MD_AVX512_BF16_TARGET void softmax_forward_rows(const float* S, int64_t N, int64_t L, int64_t Lc, float scale, u16* P,
                                            float* l, float* lse) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < N; ++i) {
    const float* s = S + i * Lc;
    u16* p_out = P + i * Lc;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < L; j += 16) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, lanes(L - j), s + j));
    const float m = _mm512_reduce_max_ps(vmax) * scale;  // scale > 0
    const __m512 vm = _mm512_set1_ps(m);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Lc; j += 16) {  // Lc is a multiple of 16
      const __mmask16 k = lanes(L - j);
      const __m512 p = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + j), vs, vm)));
      vsum = _mm512_add_ps(vsum, p);
      store_bf16(p_out + j, 0xFFFF, p);  // zeros past L
    }
    const float sum = _mm512_reduce_add_ps(vsum);
    l[i] = sum;
    if (lse) lse[i] = m + std::log(sum);
  }
}

// One (batch, head)'s softmax gradient on the transposed (L, Nc) score matrices, key rows j < L
// (query columns past N are padding and get zeros):
//   p = exp(scale s - lse[i]),  P^T = bf16(p),  dS^T = bf16(p (dp - D[i])).
MD_AVX512_BF16_TARGET void softmax_backward_rows(const float* ST, const float* dPT, const float* lse, const float* D,
                                             int64_t L, int64_t N, int64_t Nc, float scale, u16* PT, u16* dST) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < L; ++j) {
    const float* s = ST + j * Nc;
    const float* dp = dPT + j * Nc;
    for (int64_t i = 0; i < Nc; i += 16) {  // Nc is a multiple of 16
      const __mmask16 k = lanes(N - i);
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + i), vs, _mm512_maskz_loadu_ps(k, lse + i));
      const __m512 p = _mm512_maskz_mov_ps(k, exp16(x));
      const __m512 ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + i), _mm512_maskz_loadu_ps(k, D + i)));
      store_bf16(PT + j * Nc + i, 0xFFFF, p);  // zeros past N
      store_bf16(dST + j * Nc + i, 0xFFFF, ds);
    }
  }
}

// The scratch of one thread, sized for one head. Padding (rows past N or L, columns past N or
// L) is zeroed once here and never written. q and dO are copied (with a zero row) only when N
// is odd: brgemm's inner dimension must be even.
struct Scratch {
  std::vector<u16> q, dout, qt, doutt, kt, pt, dst, packed;
  std::vector<float> st, dpt, d, lse, dqt, dk, dv;
  Scratch(int64_t N, int64_t Nk, int64_t Nc, int64_t L, int64_t Lk, int64_t hd)
      : q(N == Nk ? 0 : Nk * hd, 0), dout(N == Nk ? 0 : Nk * hd, 0), qt(hd * Nc, 0), doutt(hd * Nc, 0),
        kt(hd * Lk, 0), pt(Lk * Nc, 0), dst(Lk * Nc, 0), packed(std::max({hd, Nc, Lk}) * kColumnBlock),
        st(L * Nc), dpt(L * Nc), d(N), lse(N), dqt(hd * Nc), dk(L * hd), dv(L * hd) {}
};

// dst (cols x rows, row stride ldd) = src (rows x cols, row stride lds) transposed, in 16 x 16
// tiles; cols is a multiple of 16. Inlined into the head functions.
inline __attribute__((always_inline)) void transpose(const u16* __restrict src, int64_t rows, int64_t cols,
                                                    int64_t lds, u16* __restrict dst, int64_t ldd) {
  constexpr int64_t t = 16;
  u16 tile[t][t];
  for (int64_t r0 = 0; r0 < rows; r0 += t) {
    const int64_t nr = std::min(t, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += t) {
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < t; ++c) tile[c][r] = src[(r0 + r) * lds + c0 + c];
      for (int64_t c = 0; c < t; ++c)
        for (int64_t r = 0; r < nr; ++r) dst[(c0 + c) * ldd + r0 + r] = tile[c][r];
    }
  }
}

// Copies rows x cols (row stride lds) into dst (row stride cols) and returns dst.
inline const u16* copy_rows(const u16* src, int64_t rows, int64_t cols, int64_t lds, u16* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * cols, src + r * lds, cols * sizeof(u16));
  return dst;
}

struct Args {
  Operand q, k, v, out, dout;
  const float* lse;
  int64_t lse_s0, lse_s1, lse_s2;
  u16 *dq, *dk, *dv;  // (B, seq, H, hd) contiguous
  int64_t H, N, L, hd, Nk, Nc, Lk;
  float scale;
};

struct ForwardArgs {
  Operand q, k, v;
  u16* out;    // (B, N, H, hd) contiguous
  float* lse;  // (B, H, N) contiguous
  int64_t H, N, L, hd, Lk, Lc;
  float scale;
};

// v is copied (with a zero row) only when L is odd, as q and dO above.
struct ForwardScratch {
  std::vector<u16> kt, v, p, packed;
  std::vector<float> s, o, l;
  ForwardScratch(int64_t N, int64_t L, int64_t Lk, int64_t Lc, int64_t hd)
      : kt(hd * Lc, 0), v(L == Lk ? 0 : Lk * hd, 0), p(N * Lc), packed(std::max(hd, Lc) * kColumnBlock), s(N * Lc),
        o(N * hd), l(N) {}
};

// Head (b, h) of the forward pass: S = q k^T (N, Lc), P = exp(scale S - m) in bf16, O = P v / l.
// q, k and v are brgemm's operands where they lie (rows of the (B, seq, H, hd) products).
MD_AVX512_BF16_TARGET void forward_head(const ForwardArgs& a, ForwardScratch& x, int64_t b, int64_t h) {
  const int64_t N = a.N, L = a.L, hd = a.hd, Lk = a.Lk, Lc = a.Lc;
  const u16 *q = a.q.row(b, h, 0), *k = a.k.row(b, h, 0), *v = a.v.row(b, h, 0);
  int64_t ldv = a.v.s2;
  if (L != Lk) v = copy_rows(v, L, hd, std::exchange(ldv, hd), x.v.data());
  transpose(k, L, hd, a.k.s2, x.kt.data(), Lc);  // k^T (hd, Lc)
  u16* pk = x.packed.data();
  gemm(N, Lc, hd, q, a.q.s2, x.kt.data(), Lc, x.s.data(), Lc, pk);  // S = q k^T (N, Lc)
  softmax_forward_rows(x.s.data(), N, L, Lc, a.scale, x.p.data(), x.l.data(),
                       a.lse ? a.lse + (b * a.H + h) * N : nullptr);
  gemm(N, hd, Lk, x.p.data(), Lc, v, ldv, x.o.data(), hd, pk);  // O l = P v (N, hd)
  for (int64_t i = 0; i < N; ++i) {
    u16* __restrict o = a.out + ((b * N + i) * a.H + h) * hd;
    const float* __restrict src = &x.o[i * hd];
    const float inv = 1.0f / x.l[i];
    for (int64_t c = 0; c < hd; ++c) o[c] = float_to_bf16_bits(src[c] * inv);
  }
}

// The gradients of head (b, h). q, k, v and dO are brgemm's operands where they lie.
MD_AVX512_BF16_TARGET void backward_head(const Args& a, Scratch& x, int64_t b, int64_t h) {
  const int64_t N = a.N, L = a.L, hd = a.hd, Nk = a.Nk, Nc = a.Nc, Lk = a.Lk;
  const u16 *q = a.q.row(b, h, 0), *g = a.dout.row(b, h, 0), *k = a.k.row(b, h, 0), *v = a.v.row(b, h, 0);
  int64_t ldq = a.q.s2, ldg = a.dout.s2;
  if (N != Nk) {
    q = copy_rows(q, N, hd, std::exchange(ldq, hd), x.q.data());
    g = copy_rows(g, N, hd, std::exchange(ldg, hd), x.dout.data());
  }
  for (int64_t i = 0; i < N; ++i) {  // D = rowsum(dO o), lse
    x.d[i] = dot_bf16(g + i * ldg, a.out.row(b, h, i), hd);
    x.lse[i] = a.lse[b * a.lse_s0 + h * a.lse_s1 + i * a.lse_s2];
  }
  transpose(q, N, hd, ldq, x.qt.data(), Nc);     // q^T  (hd, Nc)
  transpose(g, N, hd, ldg, x.doutt.data(), Nc);  // dO^T (hd, Nc)
  transpose(k, L, hd, a.k.s2, x.kt.data(), Lk);  // k^T  (hd, Lk)
  u16* pk = x.packed.data();
  gemm(L, Nc, hd, k, a.k.s2, x.qt.data(), Nc, x.st.data(), Nc, pk);      // S^T = k q^T     (L, Nc)
  gemm(L, Nc, hd, v, a.v.s2, x.doutt.data(), Nc, x.dpt.data(), Nc, pk);  // dP^T = v dO^T   (L, Nc)
  softmax_backward_rows(x.st.data(), x.dpt.data(), x.lse.data(), x.d.data(), L, N, Nc, a.scale, x.pt.data(),
                        x.dst.data());
  gemm(L, hd, Nk, x.pt.data(), Nc, g, ldg, x.dv.data(), hd, pk);              // dV = P^T dO     (L, hd)
  gemm(L, hd, Nk, x.dst.data(), Nc, q, ldq, x.dk.data(), hd, pk);             // dK = dS^T q     (L, hd)
  gemm(hd, Nc, Lk, x.kt.data(), Lk, x.dst.data(), Nc, x.dqt.data(), Nc, pk);  // dQ^T = k^T dS^T (hd, Nc)
  const float sc = a.scale;
  for (int64_t i = 0; i < N; ++i) {
    u16* __restrict o = a.dq + ((b * N + i) * a.H + h) * hd;
    for (int64_t c = 0; c < hd; ++c) o[c] = float_to_bf16_bits(x.dqt[c * Nc + i] * sc);
  }
  for (int64_t j = 0; j < L; ++j) {
    u16 *__restrict ok = a.dk + ((b * L + j) * a.H + h) * hd, *__restrict ov = a.dv + ((b * L + j) * a.H + h) * hd;
    const float *__restrict gk = &x.dk[j * hd], *__restrict gv = &x.dv[j * hd];
    for (int64_t c = 0; c < hd; ++c) {
      ok[c] = float_to_bf16_bits(gk[c] * sc);
      ov[c] = float_to_bf16_bits(gv[c]);
    }
  }
}

// ---- float32 ----------------------------------------------------------------------------------
// The same passes in float32 on any AVX-512 CPU, 32 queries at a time with every product of a
// block written out here (forward_head_f32, backward_head_f32 below): k, v and the outputs are
// used where they lie; only the block's q^T (and dO^T) are copied.



// sum_c a[c] b[c], float32.
MD_AVX512_TARGET inline __attribute__((always_inline)) float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = lanes(n - c);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + c), _mm512_maskz_loadu_ps(k, b + c), acc);
  }
  return _mm512_reduce_add_ps(acc);
}




// Outputs are (B, seq, H, hd) contiguous: row i of head (b, h) at ((b seq + i) H + h) hd, stride H hd.
struct ForwardArgsF32 {
  OperandF q, k, v;
  float* out;  // (B, N, H, hd)
  float* lse;  // (B, H, N)
  int64_t H, N, L, hd;
  float scale;
};

struct ForwardScratchF32 {
  // Zeroed once: lanes of q^T past the last query keep finite values, so do their scores.
  std::vector<float> qt, st;  // q^T of the block (hd, 32), its scores S^T then P^T (L, 32)
  alignas(64) float inv[kQueries];  // 1 / sum_j p per query
  ForwardScratchF32(int64_t L, int64_t hd) : qt(hd * kQueries), st(L * kQueries) {}
};

// Rows j0..j0+R of a block's S^T (L, 32): st[j] = sum_c k[j, c] q^T[c], two vectors per key,
// by broadcasting k[j, c] against the block's q^T rows (k used where it lies). Raises the
// running maxima m0, m1 (lanes 0-15, 16-31) to the new scores.
template <int R, bool kMax = true>
MD_AVX512_TARGET inline __attribute__((always_inline)) void scores_f32(const float* k, int64_t ldk, const float* qt,
                                                                       int64_t hd, float* st, __m512& m0, __m512& m1) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < hd; ++c) {
    const __m512 b0 = _mm512_loadu_ps(qt + c * kQueries), b1 = _mm512_loadu_ps(qt + c * kQueries + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(k[r * ldk + c]);
      a0[r] = _mm512_fmadd_ps(x, b0, a0[r]);
      a1[r] = _mm512_fmadd_ps(x, b1, a1[r]);
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
MD_AVX512_TARGET inline __attribute__((always_inline)) void scores_block_f32(const float* k, int64_t ldk, int64_t L,
                                                                             const float* qt, int64_t hd, float* st,
                                                                             __m512& m0, __m512& m1) {
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) scores_f32<8, kMax>(k + j * ldk, ldk, qt, hd, st + j * kQueries, m0, m1);
  switch (L - j) {
#define MD_SCORES_TAIL(R) \
  case R: scores_f32<R, kMax>(k + j * ldk, ldk, qt, hd, st + j * kQueries, m0, m1); break;
    MD_SCORES_TAIL(1) MD_SCORES_TAIL(2) MD_SCORES_TAIL(3) MD_SCORES_TAIL(4) MD_SCORES_TAIL(5) MD_SCORES_TAIL(6)
    MD_SCORES_TAIL(7)
#undef MD_SCORES_TAIL
    default: break;
  }
}

// acc[r] += sum_{n < count} a[r ra + n na] x[n] for R rows and V vectors of x's rows n (row
// stride ldx, lanes as masks): each entry of a broadcast against a row of x. Both passes' products
// after the scores are this, with a = P^T or dS^T walked down its columns or along its rows.
template <int R, int V>
MD_AVX512_TARGET inline __attribute__((always_inline)) void broadcast_product(__m512 (&acc)[R][V], const float* a,
                                                                              int64_t ra, int64_t na, const float* x,
                                                                              int64_t ldx, int64_t count,
                                                                              const __mmask16* masks) {
  for (int64_t n = 0; n < count; ++n) {
    __m512 xn[V];
    for (int u = 0; u < V; ++u) xn[u] = _mm512_maskz_loadu_ps(masks[u], x + n * ldx + 16 * u);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(a[r * ra + n * na]);
      for (int u = 0; u < V; ++u) acc[r][u] = _mm512_fmadd_ps(p, xn[u], acc[r][u]);
    }
  }
}

// Rows i0..i0+nq (nq <= Q) of O = P v / l for vectors c0/16 .. c0/16 + V of the head width:
// o[i] = inv[i] sum_j P^T[j, i] v[j], by broadcasting P^T's entries against v's rows (v used
// where it lies, the output written in its rows). masks[u]: the lanes of vector u within hd.
// Without inv (null), o[i] = sum_j P^T[j, i] v[j].
template <int Q, int V>
MD_AVX512_TARGET inline __attribute__((always_inline)) void output_f32(const float* v, int64_t ldv, int64_t L,
                                                                       const float* pt, const float* inv,
                                                                       const __mmask16* masks, float* out,
                                                                       int64_t ldo, int64_t nq) {
  __m512 acc[Q][V];
  for (int i = 0; i < Q; ++i)
    for (int u = 0; u < V; ++u) acc[i][u] = _mm512_setzero_ps();
  broadcast_product<Q, V>(acc, pt, 1, kQueries, v, ldv, L, masks);  // acc[i] += P^T[j, i] v[j]
  for (int i = 0; i < Q && i < nq; ++i) {
    const __m512 s = _mm512_set1_ps(inv ? inv[i] : 1.0f);
    for (int u = 0; u < V; ++u) _mm512_mask_storeu_ps(out + i * ldo + 16 * u, masks[u], _mm512_mul_ps(acc[i][u], s));
  }
}

// All rows of O for one query block, in column chunks of V vectors and row groups of Q.
template <int Q, int V>
MD_AVX512_TARGET void output_block_f32(const float* v, int64_t ldv, int64_t L, int64_t hd, const float* st,
                                       const float* inv, float* out, int64_t ldo, int64_t nq) {
  for (int64_t c0 = 0; c0 < hd; c0 += 16 * V) {
    __mmask16 masks[V];
    for (int u = 0; u < V; ++u) {
      const int64_t n = hd - c0 - 16 * u;
      masks[u] = n <= 0 ? (__mmask16)0 : lanes(n);
    }
    for (int64_t i = 0; i < nq; i += Q)
      output_f32<Q, V>(v + c0, ldv, L, st + i, inv ? inv + i : nullptr, masks, out + i * ldo + c0, ldo, nq - i);
  }
}

// Head (b, h) of the forward pass, 32 queries at a time, everything of a block in L1:
//   q^T (hd, 32) of the block's rows;
//   S^T = k q^T (L, 32), with the maxima m over keys (lane by lane: keys run down the columns,
//   which suits a caption's few keys);
//   P^T = exp(scale S^T - scale m), l = sum_j P^T (again lane by lane);
//   O = P v / l straight into the output's rows.
// Only q is copied (transposed); k and v are read where they lie, and no product goes through
// a library call: at these sizes (64 keys of 32) the calls and the copies around them cost
// as much as the products.
MD_AVX512_TARGET void forward_head_f32(const ForwardArgsF32& a, ForwardScratchF32& x, int64_t b, int64_t h) {
  const int64_t N = a.N, L = a.L, hd = a.hd, ldo = a.H * hd;
  const float *k = a.k.row(b, h, 0), *v = a.v.row(b, h, 0);
  float *qt = x.qt.data(), *st = x.st.data();
  const int64_t nvec = (hd + 15) / 16;
  for (int64_t i0 = 0; i0 < N; i0 += kQueries) {
    const int64_t nq = std::min(kQueries, N - i0);
    transpose_f32(a.q.row(b, h, i0), nq, hd, a.q.s2, qt, kQueries);  // q^T (hd, 32)
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    scores_block_f32<true>(k, a.k.s2, L, qt, hd, st, m0, m1);  // S^T (L, 32)
    softmax_block_forward(st, L, a.scale, m0, m1, x.inv, a.lse ? a.lse + (b * a.H + h) * N + i0 : nullptr, nq);
    float* out = a.out + ((b * N + i0) * a.H + h) * hd;
#define MD_FORWARD_OUTPUT(Q, V) output_block_f32<Q, V>(v, a.v.s2, L, hd, st, x.inv, out, ldo, nq)
    MD_BY_WIDTH(nvec, MD_FORWARD_OUTPUT);
#undef MD_FORWARD_OUTPUT
  }
}

struct ArgsF32 {
  OperandF q, k, v, out, dout;
  const float* lse;
  int64_t lse_s0, lse_s1, lse_s2;
  float *dq, *dk, *dv;  // (B, seq, H, hd)
  int64_t H, N, L, hd;
  float scale;
};

struct ScratchF32 {
  // Zeroed once, as in the forward pass: lanes past the last query stay finite.
  std::vector<float> qt, gt, st, dpt;  // q^T, dO^T (hd, 32); S^T then P^T, dP^T then scale dS^T (L, 32)
  alignas(64) float d[kQueries], lse[kQueries];
  ScratchF32(int64_t L, int64_t hd) : qt(hd * kQueries), gt(hd * kQueries), st(L * kQueries), dpt(L * kQueries) {}
};

// Rows j0..j0+R of acc (row stride ldo), vectors of the width as masks[u]: acc[j] += sum_{i < nq}
// P^T[j, i] x[i] for a block's P^T (rows of 32) and x's rows i (stride ldx): P^T's entries
// broadcast against x's rows where they lie. first: acc starts at zero instead.
template <int R, int V>
MD_AVX512_TARGET inline __attribute__((always_inline)) void accumulate_f32(const float* pt, const float* x,
                                                                           int64_t ldx, int64_t nq,
                                                                           const __mmask16* masks, float* acc_rows,
                                                                           int64_t ldo, bool first) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < V; ++u)
      acc[r][u] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[u], acc_rows + r * ldo + 16 * u);
  broadcast_product<R, V>(acc, pt, kQueries, 1, x, ldx, nq, masks);  // acc[r] += P^T[r, i] x[i]
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < V; ++u) _mm512_mask_storeu_ps(acc_rows + r * ldo + 16 * u, masks[u], acc[r][u]);
}

// All L rows of acc (L, hd) += P^T x over a block's nq queries, R rows and V vectors at a time.
template <int R, int V>
MD_AVX512_TARGET void accumulate_block_f32(const float* st, int64_t L, const float* x, int64_t ldx, int64_t nq,
                                           int64_t hd, float* acc, int64_t ldo, bool first) {
  for (int64_t c0 = 0; c0 < hd; c0 += 16 * V) {
    __mmask16 masks[V];
    for (int u = 0; u < V; ++u) {
      const int64_t n = hd - c0 - 16 * u;
      masks[u] = n <= 0 ? (__mmask16)0 : lanes(n);
    }
    int64_t j = 0;
    for (; j + R <= L; j += R)
      accumulate_f32<R, V>(st + j * kQueries, x + c0, ldx, nq, masks, acc + j * ldo + c0, ldo, first);
    for (; j < L; ++j)
      accumulate_f32<1, V>(st + j * kQueries, x + c0, ldx, nq, masks, acc + j * ldo + c0, ldo, first);
  }
}


// The gradients of head (b, h), 32 queries at a time as in the forward pass, all in L1:
//   q^T, dO^T (hd, 32) of the block's rows; D = rowsum(dO o O) and the lse of its queries;
//   S^T = k q^T and dP^T = v dO^T (L, 32) by broadcasting k and v against them;
//   P^T = exp(scale S^T - lse), scale dS^T = scale P^T (dP^T - D);
//   dV += P^T dO and dK += scale dS^T q over the block's queries, straight in their outputs' rows;
//   dQ = scale dS k for the block's rows, straight in its output's rows.
// Only q and dO are copied (transposed); no product goes through a library call.
MD_AVX512_TARGET void backward_head_f32(const ArgsF32& a, ScratchF32& x, int64_t b, int64_t h) {
  const int64_t N = a.N, L = a.L, hd = a.hd, ldo = a.H * hd, nvec = (hd + 15) / 16;
  const float *k = a.k.row(b, h, 0), *v = a.v.row(b, h, 0);
  float *qt = x.qt.data(), *gt = x.gt.data(), *st = x.st.data(), *dpt = x.dpt.data();
  float *dk = a.dk + (b * L * a.H + h) * hd, *dv = a.dv + (b * L * a.H + h) * hd;  // row j at + j ldo
  for (int64_t i0 = 0; i0 < N; i0 += kQueries) {
    const int64_t nq = std::min(kQueries, N - i0);
    const float *q = a.q.row(b, h, i0), *g = a.dout.row(b, h, i0);
    for (int64_t i = 0; i < nq; ++i) {
      x.d[i] = dot_f32(g + i * a.dout.s2, a.out.row(b, h, i0 + i), hd);
      x.lse[i] = a.lse[b * a.lse_s0 + h * a.lse_s1 + (i0 + i) * a.lse_s2];
    }
    for (int64_t i = nq; i < kQueries; ++i) x.d[i] = x.lse[i] = 0.0f;  // finite lanes past the end
    transpose_f32(q, nq, hd, a.q.s2, qt, kQueries);     // q^T  (hd, 32)
    transpose_f32(g, nq, hd, a.dout.s2, gt, kQueries);  // dO^T (hd, 32)
    __m512 unused0, unused1;
    scores_block_f32<false>(k, a.k.s2, L, qt, hd, st, unused0, unused1);   // S^T  (L, 32)
    scores_block_f32<false>(v, a.v.s2, L, gt, hd, dpt, unused0, unused1);  // dP^T (L, 32)
    softmax_block_backward(st, dpt, L, a.scale, x.lse, x.d);  // P^T, scale dS^T
    const bool first = i0 == 0;
    float* dq = a.dq + ((b * N + i0) * a.H + h) * hd;
#define MD_BACKWARD_PRODUCTS(R, V)                                                         \
  accumulate_block_f32<R, V>(st, L, g, a.dout.s2, nq, hd, dv, ldo, first); /* dV (L, hd) */  \
  accumulate_block_f32<R, V>(dpt, L, q, a.q.s2, nq, hd, dk, ldo, first);   /* dK (L, hd) */  \
  output_block_f32<R, V>(k, a.k.s2, L, hd, dpt, nullptr, dq, ldo, nq)      /* dQ (nq, hd) */
    MD_BY_WIDTH(nvec, MD_BACKWARD_PRODUCTS);
#undef MD_BACKWARD_PRODUCTS
  }
}

}  // namespace

namespace attention_detail {

void check(bool ok, at::ScalarType dt, const std::string& what) {
  if (!ok)
    throw std::runtime_error(std::string("CPU ") + (dt == at::kBFloat16 ? "bf16" : "float32") + " attention: " + what);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::ScalarType dt) {
  check(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
            k.size(1) == q.size(1) && k.size(3) == q.size(3),
        dt, "q must be (B, H, N, hd) and k, v (B, H, L, hd)");
  if (dt == at::kBFloat16)
    check(bf16_attention_applies(q.size(3)), dt,
          "head size " + std::to_string(q.size(3)) + " is not a multiple of 16 up to 256");
  check(q.size(2) > 0 && k.size(2) > 0 && q.size(3) > 0, dt, "empty sequence or head");
  const char* what = dt == at::kBFloat16 ? "q, k, v must be bf16 CPU tensors with contiguous rows"
                                         : "q, k, v must be float32 CPU tensors with contiguous rows";
  for (const at::Tensor* t : {&q, &k, &v})
    check(t->device().is_cpu() && t->scalar_type() == dt && t->stride(3) == 1, dt, what);
}

void check_backward_inputs(const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
                           at::ScalarType dt) {
  check(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), dt, "out and dout must have q's shape");
  for (const at::Tensor* t : {&out, &dout})
    check(t->device().is_cpu() && t->scalar_type() == dt && t->stride(3) == 1, dt,
          std::string("out and dout must be ") + (dt == at::kBFloat16 ? "bf16" : "float32") +
              " CPU tensors with contiguous rows");
  check(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
            lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
        dt, "lse must be float32 (B, H, N)");
}

}  // namespace attention_detail

bool amx_attention_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-bf16") != 0 && __builtin_cpu_supports("avx512bf16") != 0 &&
           at::cpu::init_amx() && cb::could_pack(at::kBFloat16);
  }();
  return ok;
}

bool avx512_bf16_attention_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return avx512_attention_available() && __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return ok;
}

bool bf16_attention_available() { return amx_attention_available() || avx512_bf16_attention_available(); }

bool bf16_attention_applies(int64_t head_dim) { return head_dim > 0 && head_dim % 16 == 0 && head_dim <= 256; }

bool avx512_attention_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("avx512bw") != 0 &&
           __builtin_cpu_supports("avx512vl") != 0 && __builtin_cpu_supports("avx512dq") != 0 &&
           __builtin_cpu_supports("fma") != 0;
  }();
  return ok;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_bf16(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, bool with_lse) {
  if (!amx_attention_available()) return attention_forward_bf16_avx512(q, k, v, scale, with_lse);
  check_inputs(q, k, v, at::kBFloat16);
  check(scale > 0, at::kBFloat16, "scale must be positive");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), hd = q.size(3);
  at::Tensor out = at::empty({B, N, H, hd}, q.options().memory_format(c10::MemoryFormat::Contiguous));
  at::Tensor lse;
  if (with_lse) lse = at::empty({B, H, N}, q.options().dtype(at::kFloat).memory_format(c10::MemoryFormat::Contiguous));
  const ForwardArgs args{operand(q), operand(k), operand(v), reinterpret_cast<u16*>(out.data_ptr()),
                         with_lse ? lse.data_ptr<float>() : nullptr, H, N, L, hd, round_up(L, 2), round_up(L, 16),
                         static_cast<float>(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    ForwardScratch x(N, L, args.Lk, args.Lc, hd);
    for (int64_t w = w0; w < w1; ++w) forward_head(args, x, w / H, w % H);
    cb::brgemm_release();
  });
  return {out.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_bf16(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& out,
                                                                       const at::Tensor& lse, const at::Tensor& dout,
                                                                       double scale) {
  if (!amx_attention_available()) return attention_backward_bf16_avx512(q, k, v, out, lse, dout, scale);
  check_inputs(q, k, v, at::kBFloat16);
  check_backward_inputs(q, out, lse, dout, at::kBFloat16);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), hd = q.size(3);

  const int64_t Nk = round_up(N, 2), Nc = round_up(N, 16), Lk = round_up(L, 2);
  const auto opts = q.options().memory_format(c10::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty({B, N, H, hd}, opts), dk = at::empty({B, L, H, hd}, opts),
             dv = at::empty({B, L, H, hd}, opts);  // (B, seq, H, hd): the products' layout
  const Args args{operand(q), operand(k), operand(v), operand(out), operand(dout),
                  lse.data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2),
                  reinterpret_cast<u16*>(dq.data_ptr()), reinterpret_cast<u16*>(dk.data_ptr()),
                  reinterpret_cast<u16*>(dv.data_ptr()), H, N, L, hd, Nk, Nc, Lk, static_cast<float>(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    Scratch x(N, Nk, Nc, L, Lk, hd);
    for (int64_t w = w0; w < w1; ++w) backward_head(args, x, w / H, w % H);
    cb::brgemm_release();
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

std::tuple<at::Tensor, at::Tensor> attention_forward_f32(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale, bool with_lse) {
  check(avx512_attention_available(), at::kFloat, "this CPU has no AVX-512");
  check_inputs(q, k, v, at::kFloat);
  check(scale > 0, at::kFloat, "scale must be positive");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), hd = q.size(3);
  at::Tensor out = at::empty({B, N, H, hd}, q.options().memory_format(c10::MemoryFormat::Contiguous));
  at::Tensor lse;
  if (with_lse) lse = at::empty({B, H, N}, q.options().memory_format(c10::MemoryFormat::Contiguous));
  const ForwardArgsF32 args{operand_f32(q), operand_f32(k), operand_f32(v), out.data_ptr<float>(),
                            with_lse ? lse.data_ptr<float>() : nullptr, H, N, L, hd, static_cast<float>(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    ForwardScratchF32 x(L, hd);
    for (int64_t w = w0; w < w1; ++w) forward_head_f32(args, x, w / H, w % H);
  });
  return {out.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_f32(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, const at::Tensor& out,
                                                                      const at::Tensor& lse, const at::Tensor& dout,
                                                                      double scale) {
  check(avx512_attention_available(), at::kFloat, "this CPU has no AVX-512");
  check_inputs(q, k, v, at::kFloat);
  check_backward_inputs(q, out, lse, dout, at::kFloat);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), hd = q.size(3);
  const auto opts = q.options().memory_format(c10::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty({B, N, H, hd}, opts), dk = at::empty({B, L, H, hd}, opts),
             dv = at::empty({B, L, H, hd}, opts);  // (B, seq, H, hd)
  const ArgsF32 args{operand_f32(q), operand_f32(k), operand_f32(v), operand_f32(out), operand_f32(dout),
                     lse.data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2),
                     dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
                     H, N, L, hd, static_cast<float>(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    ScratchF32 x(L, hd);
    for (int64_t w = w0; w < w1; ++w) backward_head_f32(args, x, w / H, w % H);
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

}  // namespace microdit::kernels::cpu
