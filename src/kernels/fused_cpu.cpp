// The fused kernels of kernels/fused.h on the CPU (kernels::cpu). Same arithmetic as the CUDA
// ones: float32 throughout, inputs converted on load and results rounded on store.
//
// Each kernel is a template body compiled three times, for AVX-512, AVX2 and plain x86-64,
// through GCC's `target` attribute; the first call picks the widest the CPU has. The bodies
// are written as loops over a row held in a float buffer, which GCC vectorizes at -O2/-O3;
// sums run in 16 lanes so that they vectorize too (their order is fixed, so the results do
// not depend on the instruction set more than float rounding allows).
#include "kernels/fused.h"
#include "kernels/cpu_math.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace microdit::kernels::cpu {

namespace {

struct bf16 {
  uint16_t bits;
};

#define MD_INLINE inline __attribute__((always_inline))

MD_INLINE float to_f(float v) { return v; }
MD_INLINE float to_f(bf16 v) { return bf16_bits_to_float(v.bits); }

template <typename T> MD_INLINE T from_f(float v);
template <> MD_INLINE float from_f<float>(float v) { return v; }
template <> MD_INLINE bf16 from_f<bf16>(float v) { return bf16{float_to_bf16_bits(v)}; }

template <typename T> MD_INLINE float round_to(float v) { return to_f(from_f<T>(v)); }

constexpr int kLanes = 16;

// Sum of v[0..n) in kLanes partial sums.
MD_INLINE float lane_sum(const float* v, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += v[j + l];
  float s = 0.f;
  for (; j < n; ++j) s += v[j];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// A row-wise kernel's input usually comes from beyond L2 (a product wrote it long ago, or the
// other operands pushed it out); rows shorter than a page give the hardware prefetcher little
// to go on, so each row asks for the one kPrefetchRows ahead.
constexpr int64_t kPrefetchRows = 8;
template <typename T>
MD_INLINE void prefetch_row(const T* p, int64_t n, bool valid) {
  if (!valid) return;
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < n * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(c + o, 0, 3);
}

// The arguments of each kernel, so that one pointer type serves every instruction set.
struct LnFwd {
  const void* x;
  int64_t ldx;
  void* xs;
  const float* w;
  const void *shift, *scale;
  void* y;
  float *mean, *rstd;
  int64_t T, d;
  float eps;
  // The float32 AVX-512 body only (modln_fwd_f32_avx512): when res_h is set, the norm's input
  // is x + res_gate[b] * res_h (x + res_h without a gate), written to res_out.
  const float *res_h = nullptr, *res_gate = nullptr;
  float* res_out = nullptr;
  int64_t ldy = 0;  // y's row stride there (0: d)
};
struct LnDx {
  const void* dy;
  const void* xs;
  int64_t lds;
  const float* w;
  const void* scale;
  const float *mean, *rstd;
  void* dx;
  int64_t ldx;
  const void* dres;  // null, or rows x d (contiguous, dx's dtype) added to dx
  int64_t T, d;
  float *s0 = nullptr, *s1 = nullptr;  // (B, d): modln_backward_dx_sums' per-sample sums, added to here
};
struct LnSums {
  const void *dy, *xs;
  int64_t lds;
  const float *mean, *rstd;
  float *s0, *s1;
  int64_t T, d;
};
struct Swiglu {
  const void *dp, *u, *v;  // forward: dp is null
  void *out, *dv;          // forward: p (dv null); backward: du and dv
};
struct MoeSum {
  const void* src;  // (E, B, k, d)
  const float* w;   // (B, E, k) or null
  const int32_t* inv;  // (B, T, E)
  void* dst;        // (B, T, d)
  int64_t B, T, E, k, d;
};
struct Gated {
  const void *x, *gate, *h;  // backward: x is dout
  void* out;                 // backward: dh
  float* dgate;
  int64_t T, d;
};

// Rows r0..r1 of the modulated LayerNorm forward (model/fused.h has the formula).
template <typename X, typename S, typename Y>
MD_INLINE void modln_fwd_rows(const LnFwd& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  const Y* __restrict shift = static_cast<const Y*>(a.shift);
  const Y* __restrict scale = static_cast<const Y*>(a.scale);
  const float* __restrict w = a.w;
  std::vector<float> buf(static_cast<size_t>(2 * d));
  float* __restrict v = buf.data();  // the row, centred
  float* __restrict m = v + d;       // w * (1 + scale[b]) for the current sample b
  int64_t b_loaded = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const X* __restrict xr = static_cast<const X*>(a.x) + r * a.ldx;
    prefetch_row(xr + kPrefetchRows * a.ldx, d, r + kPrefetchRows < r1);
    for (int64_t j = 0; j < d; ++j) v[j] = round_to<S>(to_f(xr[j]));
    if (a.xs) {
      S* __restrict xs = static_cast<S*>(a.xs) + r * d;
      for (int64_t j = 0; j < d; ++j) xs[j] = from_f<S>(v[j]);
    }
    const float mean = lane_sum(v, d) / static_cast<float>(d);
    for (int64_t j = 0; j < d; ++j) v[j] -= mean;
    float acc[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += v[j + l] * v[j + l];
    float q = 0.f;
    for (; j < d; ++j) q += v[j] * v[j];
    for (int l = 0; l < kLanes; ++l) q += acc[l];
    const float rstd = 1.f / std::sqrt(q / static_cast<float>(d) + a.eps);
    Y* __restrict yr = static_cast<Y*>(a.y) + r * d;
    if (scale) {
      const int64_t b = r / a.T;
      if (b != b_loaded) {
        for (int64_t k = 0; k < d; ++k) m[k] = (w ? w[k] : 1.f) * (1.f + to_f(scale[b * d + k]));
        b_loaded = b;
      }
      const Y* __restrict sh = shift + b * d;
      for (int64_t k = 0; k < d; ++k) yr[k] = from_f<Y>(v[k] * rstd * m[k] + to_f(sh[k]));
    } else if (w) {
      for (int64_t k = 0; k < d; ++k) yr[k] = from_f<Y>(v[k] * rstd * w[k]);
    } else {
      for (int64_t k = 0; k < d; ++k) yr[k] = from_f<Y>(v[k] * rstd);
    }
    a.mean[r] = mean;
    a.rstd[r] = rstd;
  }
}

// Rows r0..r1 of dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * (1 + scale) * w.
template <typename X, typename S, typename Y>
MD_INLINE void modln_dx_rows(const LnDx& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  const Y* __restrict scale = static_cast<const Y*>(a.scale);
  const float* __restrict w = a.w;
  std::vector<float> buf(static_cast<size_t>(3 * d));
  float *__restrict g = buf.data(), *__restrict xh = g + d, *__restrict gx = xh + d;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.T;
    const float mu = a.mean[r], rs = a.rstd[r];
    const Y* __restrict dyr = static_cast<const Y*>(a.dy) + r * d;
    const S* __restrict xr = static_cast<const S*>(a.xs) + r * a.lds;
    prefetch_row(dyr + kPrefetchRows * d, d, r + kPrefetchRows < r1);
    prefetch_row(xr + kPrefetchRows * a.lds, d, r + kPrefetchRows < r1);
    for (int64_t j = 0; j < d; ++j) g[j] = to_f(dyr[j]);
    if (scale)
      for (int64_t j = 0; j < d; ++j) g[j] *= 1.f + to_f(scale[b * d + j]);
    if (w)
      for (int64_t j = 0; j < d; ++j) g[j] *= w[j];
    for (int64_t j = 0; j < d; ++j) {
      xh[j] = (to_f(xr[j]) - mu) * rs;
      gx[j] = g[j] * xh[j];
    }
    const float c1 = lane_sum(g, d) / static_cast<float>(d);
    const float c2 = lane_sum(gx, d) / static_cast<float>(d);
    X* __restrict dxr = static_cast<X*>(a.dx) + r * a.ldx;
    for (int64_t j = 0; j < d; ++j) dxr[j] = from_f<X>(rs * (g[j] - c1 - xh[j] * c2));
    if (a.dres) {
      // A loop of its own: dx is rounded (stored) before the add, which therefore cannot be
      // contracted into a fused multiply-add with the product above.
      const X* __restrict res = static_cast<const X*>(a.dres) + r * d;
      for (int64_t j = 0; j < d; ++j) dxr[j] = from_f<X>(to_f(dxr[j]) + to_f(res[j]));
    }
  }
}

// Samples b0..b1 of s0[b, j] += sum_t dy, s1[b, j] += sum_t dy * xhat (rows in order).
template <typename S, typename Y>
MD_INLINE void modln_sums_samples(const LnSums& a, int64_t b0, int64_t b1) {
  const int64_t d = a.d;
  for (int64_t b = b0; b < b1; ++b) {
    float *__restrict s0 = a.s0 + b * d, *__restrict s1 = a.s1 + b * d;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t r = b * a.T + t;
      const float mu = a.mean[r], rs = a.rstd[r];
      const Y* __restrict dyr = static_cast<const Y*>(a.dy) + r * d;
      const S* __restrict xr = static_cast<const S*>(a.xs) + r * a.lds;
      for (int64_t j = 0; j < d; ++j) {
        const float g = to_f(dyr[j]);
        s0[j] += g;
        s1[j] += g * ((to_f(xr[j]) - mu) * rs);
      }
    }
  }
}

// Rows r0..r1 of out = x + gate[b] * h.
template <typename X, typename G, typename H>
MD_INLINE void gated_fwd_rows(const Gated& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  for (int64_t r = r0; r < r1; ++r) {
    const X* __restrict x = static_cast<const X*>(a.x) + r * d;
    const H* h = static_cast<const H*>(a.h) + r * d;  // out may be h (sampling writes over h)
    prefetch_row(x + kPrefetchRows * d, d, r + kPrefetchRows < r1);
    prefetch_row(h + kPrefetchRows * d, d, r + kPrefetchRows < r1);
    const G* __restrict g = static_cast<const G*>(a.gate) + (r / a.T) * d;
    X* out = static_cast<X*>(a.out) + r * d;
    for (int64_t j = 0; j < d; ++j) out[j] = from_f<X>(to_f(x[j]) + to_f(g[j]) * to_f(h[j]));
  }
}

// Samples b0..b1 of dh = dout * gate[b], dgate[b, j] += sum_t dout * h (x holds dout).
template <typename O, typename G, typename H>
MD_INLINE void gated_bwd_samples(const Gated& a, int64_t b0, int64_t b1) {
  const int64_t d = a.d;
  for (int64_t b = b0; b < b1; ++b) {
    const G* __restrict g = static_cast<const G*>(a.gate) + b * d;
    float* __restrict acc = a.dgate + b * d;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t o = (b * a.T + t) * d;
      const O* __restrict dout = static_cast<const O*>(a.x) + o;
      const H* __restrict h = static_cast<const H*>(a.h) + o;
      H* __restrict dh = static_cast<H*>(a.out) + o;
      for (int64_t j = 0; j < d; ++j) {
        const float v = to_f(dout[j]);
        dh[j] = from_f<H>(v * to_f(g[j]));
        acc[j] += v * to_f(h[j]);
      }
    }
  }
}

MD_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

// p[i] = silu(u[i]) * v[i] for i in [i0, i1).
template <typename T>
MD_INLINE void swiglu_fwd_range(const Swiglu& a, int64_t i0, int64_t i1) {
  const T* u = static_cast<const T*>(a.u);  // p may be u (sampling writes over u)
  const T* __restrict v = static_cast<const T*>(a.v);
  T* p = static_cast<T*>(a.out);
  for (int64_t i = i0; i < i1; ++i) {
    const float x = to_f(u[i]);
    p[i] = from_f<T>(x * sigmoid(x) * to_f(v[i]));
  }
}

// du, dv for i in [i0, i1) (kernels/fused.h has the formulas).
template <typename T>
MD_INLINE void swiglu_bwd_range(const Swiglu& a, int64_t i0, int64_t i1) {
  const T* __restrict dp = static_cast<const T*>(a.dp);
  const T* __restrict u = static_cast<const T*>(a.u);
  const T* __restrict v = static_cast<const T*>(a.v);
  T* __restrict du = static_cast<T*>(a.out);
  T* __restrict dv = static_cast<T*>(a.dv);
  for (int64_t i = i0; i < i1; ++i) {
    const float x = to_f(u[i]), g = to_f(dp[i]), s = sigmoid(x);
    du[i] = from_f<T>(g * to_f(v[i]) * (s * (1.0f + x * (1.0f - s))));
    dv[i] = from_f<T>(g * x * s);
  }
}

// Each body above, compiled for one instruction set: a plain function with a target
// attribute, into which GCC inlines the body (lambdas would not inherit the attribute).
// Token rows r0..r1 (r = b * T + t) of moe_scatter_sum: the experts' rows summed in float32 in
// expert order, each rounded to D first.
template <typename S, typename D>
MD_INLINE void moe_sum_rows(const MoeSum& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  std::vector<float> buf(static_cast<size_t>(2 * d));
  float* __restrict acc = buf.data();
  float* __restrict prod = acc + d;  // the products, stored so that no FMA fuses them into the sum
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.T;
    for (int64_t j = 0; j < d; ++j) acc[j] = 0.f;
    for (int64_t e = 0; e < a.E; ++e) {
      const int32_t s = a.inv[r * a.E + e];
      if (s < 0) continue;
      const S* __restrict row = static_cast<const S*>(a.src) + ((e * a.B + b) * a.k + s) * d;
      if (a.w) {
        const float g = a.w[(b * a.E + e) * a.k + s];
        for (int64_t j = 0; j < d; ++j) prod[j] = g * to_f(row[j]);
        for (int64_t j = 0; j < d; ++j) acc[j] += round_to<D>(prod[j]);
      } else {
        for (int64_t j = 0; j < d; ++j) acc[j] += round_to<D>(to_f(row[j]));
      }
    }
    D* __restrict out = static_cast<D*>(a.dst) + r * d;
    for (int64_t j = 0; j < d; ++j) out[j] = from_f<D>(acc[j]);
  }
}

#define MD_ISA_FUNCTIONS(SUFFIX, TARGET)                                                                       \
  template <typename X, typename S, typename Y>                                                                 \
  TARGET void modln_fwd_##SUFFIX(const LnFwd& a, int64_t i0, int64_t i1) { modln_fwd_rows<X, S, Y>(a, i0, i1); } \
  template <typename X, typename S, typename Y>                                                                \
  TARGET void modln_dx_##SUFFIX(const LnDx& a, int64_t i0, int64_t i1) { modln_dx_rows<X, S, Y>(a, i0, i1); }  \
  template <typename S, typename Y>                                                                            \
  TARGET void modln_sums_##SUFFIX(const LnSums& a, int64_t i0, int64_t i1) { modln_sums_samples<S, Y>(a, i0, i1); } \
  template <typename X, typename G, typename H>                                                                \
  TARGET void gated_fwd_##SUFFIX(const Gated& a, int64_t i0, int64_t i1) { gated_fwd_rows<X, G, H>(a, i0, i1); } \
  template <typename O, typename G, typename H>                                                                \
  TARGET void gated_bwd_##SUFFIX(const Gated& a, int64_t i0, int64_t i1) { gated_bwd_samples<O, G, H>(a, i0, i1); } \
  template <typename T>                                                                                        \
  TARGET void swiglu_fwd_##SUFFIX(const Swiglu& a, int64_t i0, int64_t i1) { swiglu_fwd_range<T>(a, i0, i1); } \
  template <typename T>                                                                                        \
  TARGET void swiglu_bwd_##SUFFIX(const Swiglu& a, int64_t i0, int64_t i1) { swiglu_bwd_range<T>(a, i0, i1); } \
  template <typename S, typename D>                                                                            \
  TARGET void moe_sum_##SUFFIX(const MoeSum& a, int64_t i0, int64_t i1) { moe_sum_rows<S, D>(a, i0, i1); }

MD_ISA_FUNCTIONS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))))
MD_ISA_FUNCTIONS(avx2, __attribute__((target("avx2,fma"))))
MD_ISA_FUNCTIONS(base, )

// The float32 LayerNorm passes written out in AVX-512 for rows of whole vectors (d % 16 == 0).
#define MD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

// 16 values of the residual sum x + g h (x + h when g is null; one fused multiply-add, as
// gated_fwd_rows compiles to), stored to out and v and returned.
MD_AVX512 MD_INLINE __m512 residual_sum(const float* x, const float* g, const float* h, float* out, float* v) {
  const __m512 xj = _mm512_loadu_ps(x), hj = _mm512_loadu_ps(h);
  const __m512 s = g ? _mm512_fmadd_ps(_mm512_loadu_ps(g), hj, xj) : _mm512_add_ps(xj, hj);
  _mm512_storeu_ps(out, s);
  _mm512_storeu_ps(v, s);
  return s;
}

// 16 float32 or bf16 values widened to float32, and 16 float32 values stored as float32 or
// rounded to bf16 (nearest even, NaN a quiet NaN: float_to_bf16_bits in vector form).
MD_AVX512 MD_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MD_AVX512 MD_INLINE __m512 load16(const bf16* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
MD_AVX512 MD_INLINE void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
MD_AVX512 MD_INLINE void store16(bf16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

// m[0, d) = w (1 + scale_b), w (scale_b null) or 1 (both null): the per-sample row factor.
template <typename Y = float>
MD_AVX512 MD_INLINE void row_factor(float* m, const float* w, const Y* scale_b, int64_t d) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t k = 0; k < d; k += 16) {
    const __m512 sc = scale_b ? _mm512_add_ps(one, load16(scale_b + k)) : one;
    _mm512_storeu_ps(m + k, w ? _mm512_mul_ps(_mm512_loadu_ps(w + k), sc) : sc);
  }
}

// The forward pass, the case of float32 training and sampling. The generic body above, as GCC
// compiles it, spends most of a short row on its two sums' last steps (16 dependent scalar
// adds each, its accumulators spilled to the stack); here each sum runs in two vector
// accumulators and ends in one horizontal reduction. Same formula; the sums' order differs, so
// results differ from the generic body by float rounding only.
// The forward pass for rows of whole vectors: x and the kept copy of type X (float32, or bf16
// in the bf16 passes), y, shift and scale of type Y (float32, or bf16 under autocast).
template <typename X, typename Y>
MD_AVX512 void modln_fwd_avx512(const LnFwd& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  const Y* __restrict shift = static_cast<const Y*>(a.shift);
  const Y* __restrict scale = static_cast<const Y*>(a.scale);
  const float* __restrict w = a.w;
  std::vector<float> buf(static_cast<size_t>(2 * d));
  float* __restrict v = buf.data();  // the row, centred
  float* __restrict m = v + d;       // w * (1 + scale[b]), or w, or 1
  int64_t b_loaded = -1;
  if (!scale) row_factor<Y>(m, w, nullptr, d);
  for (int64_t r = r0; r < r1; ++r) {
    const X* xr = static_cast<const X*>(a.x) + r * a.ldx;  // not restrict: y may be x
    prefetch_row(xr + kPrefetchRows * a.ldx, d, r + kPrefetchRows < r1);
    X* __restrict xs = a.xs ? static_cast<X*>(a.xs) + r * d : nullptr;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t j = 0;
    bool summed = false;  // the float32 residual variant: the norm's input is x + g h
    if constexpr (std::is_same_v<X, float>) {
      if (a.res_h) {
        // The residual sum first: x + g h, one fused multiply-add as gated_fwd_rows compiles to.
        const float* hr = a.res_h + r * d;  // out may be hr (sampling writes the sum over h)
        prefetch_row(hr + kPrefetchRows * d, d, r + kPrefetchRows < r1);
        const float* __restrict g = a.res_gate ? a.res_gate + (r / a.T) * d : nullptr;
        float* out = a.res_out + r * d;
        for (; j + 32 <= d; j += 32) {
          const __m512 x0 = residual_sum(xr + j, g ? g + j : nullptr, hr + j, out + j, v + j);
          const __m512 x1 = residual_sum(xr + j + 16, g ? g + j + 16 : nullptr, hr + j + 16, out + j + 16, v + j + 16);
          s0 = _mm512_add_ps(s0, x0);
          s1 = _mm512_add_ps(s1, x1);
        }
        if (j < d) s0 = _mm512_add_ps(s0, residual_sum(xr + j, g ? g + j : nullptr, hr + j, out + j, v + j));
        summed = true;
      }
    }
    if (!summed) {
      for (; j + 32 <= d; j += 32) {
        const __m512 x0 = load16(xr + j), x1 = load16(xr + j + 16);
        s0 = _mm512_add_ps(s0, x0);
        s1 = _mm512_add_ps(s1, x1);
        _mm512_storeu_ps(v + j, x0);
        _mm512_storeu_ps(v + j + 16, x1);
      }
      if (j < d) {
        const __m512 x0 = load16(xr + j);
        s0 = _mm512_add_ps(s0, x0);
        _mm512_storeu_ps(v + j, x0);
      }
    }
    // The kept input: the residual sum where there is one, else x as it came.
    if (xs) std::memcpy(xs, summed ? static_cast<const void*>(v) : static_cast<const void*>(xr), static_cast<size_t>(d) * sizeof(X));
    const float mean = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(d);
    const __m512 mu = _mm512_set1_ps(mean);
    s0 = _mm512_setzero_ps();
    s1 = _mm512_setzero_ps();
    for (j = 0; j + 32 <= d; j += 32) {
      const __m512 c0 = _mm512_sub_ps(_mm512_loadu_ps(v + j), mu);
      const __m512 c1 = _mm512_sub_ps(_mm512_loadu_ps(v + j + 16), mu);
      s0 = _mm512_fmadd_ps(c0, c0, s0);
      s1 = _mm512_fmadd_ps(c1, c1, s1);
      _mm512_storeu_ps(v + j, c0);
      _mm512_storeu_ps(v + j + 16, c1);
    }
    if (j < d) {
      const __m512 c0 = _mm512_sub_ps(_mm512_loadu_ps(v + j), mu);
      s0 = _mm512_fmadd_ps(c0, c0, s0);
      _mm512_storeu_ps(v + j, c0);
    }
    const float q = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    const float rstd = 1.f / std::sqrt(q / static_cast<float>(d) + a.eps);
    const __m512 rs = _mm512_set1_ps(rstd);
    Y* yr = static_cast<Y*>(a.y) + r * (a.ldy ? a.ldy : d);  // may be xr (in place)
    if (scale) {
      const int64_t b = r / a.T;
      if (b != b_loaded) {
        row_factor<Y>(m, w, scale + b * d, d);
        b_loaded = b;
      }
      const Y* __restrict sh = shift + b * d;
      for (int64_t k = 0; k < d; k += 16)
        store16(yr + k, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(v + k), rs), _mm512_loadu_ps(m + k),
                                        load16(sh + k)));
    } else {
      for (int64_t k = 0; k < d; k += 16)
        store16(yr + k, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(v + k), rs), _mm512_loadu_ps(m + k)));
    }
    a.mean[r] = mean;
    a.rstd[r] = rstd;
  }
}

// The float32 forward pass (training and sampling in float32), also the residual sum's.
MD_AVX512 void modln_fwd_f32_avx512(const LnFwd& a, int64_t r0, int64_t r1) { modln_fwd_avx512<float, float>(a, r0, r1); }

// s0 += dy, s1 += dy xhat over 16 columns.
MD_AVX512 inline __attribute__((always_inline)) void add_sums(float* s0, float* s1, __m512 dy, __m512 xh) {
  _mm512_storeu_ps(s0, _mm512_add_ps(_mm512_loadu_ps(s0), dy));
  _mm512_storeu_ps(s1, _mm512_fmadd_ps(dy, xh, _mm512_loadu_ps(s1)));
}

// The float32 dx pass in AVX-512 for rows of whole vectors, as modln_fwd_f32_avx512 is to the
// generic forward body: g = dy * (w (1 + scale[b])), xhat and both means in one pass over the
// row (two vector accumulators each), dx in a second.
// With kSums, the same pass adds the per-sample sums of modln_sums_samples to a.s0, a.s1 (rows
// r0..r1 then whole samples, in order: the same additions as that pass, which then need not read
// dy and xs again).
template <bool kSums>
MD_AVX512 void modln_dx_f32_avx512_rows(const LnDx& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  const float* __restrict scale = static_cast<const float*>(a.scale);
  const float* __restrict w = a.w;
  std::vector<float> buf(static_cast<size_t>(3 * d));
  float *__restrict g = buf.data(), *__restrict xh = g + d, *__restrict m = xh + d;  // m: w (1 + scale[b])
  int64_t b_loaded = -1;
  if (!scale) row_factor<float>(m, w, nullptr, d);
  const float inv_d = 1.f / static_cast<float>(d);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.T;
    if (scale && b != b_loaded) {
      row_factor(m, w, scale + b * d, d);
      b_loaded = b;
    }
    const float* __restrict dyr = static_cast<const float*>(a.dy) + r * d;
    const float* __restrict xr = static_cast<const float*>(a.xs) + r * a.lds;
    prefetch_row(dyr + kPrefetchRows * d, d, r + kPrefetchRows < r1);
    prefetch_row(xr + kPrefetchRows * a.lds, d, r + kPrefetchRows < r1);
    const __m512 mu = _mm512_set1_ps(a.mean[r]), rs = _mm512_set1_ps(a.rstd[r]);
    __m512 g0 = _mm512_setzero_ps(), g1 = g0, q0 = g0, q1 = g0;
    int64_t j = 0;
    float *__restrict s0 = kSums ? a.s0 + b * d : nullptr, *__restrict s1 = kSums ? a.s1 + b * d : nullptr;
    for (; j + 32 <= d; j += 32) {
      const __m512 dya = _mm512_loadu_ps(dyr + j), dyb = _mm512_loadu_ps(dyr + j + 16);
      const __m512 ga = _mm512_mul_ps(dya, _mm512_loadu_ps(m + j));
      const __m512 gb = _mm512_mul_ps(dyb, _mm512_loadu_ps(m + j + 16));
      const __m512 xa = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + j), mu), rs);
      const __m512 xb = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + j + 16), mu), rs);
      if constexpr (kSums) {
        add_sums(s0 + j, s1 + j, dya, xa);
        add_sums(s0 + j + 16, s1 + j + 16, dyb, xb);
      }
      g0 = _mm512_add_ps(g0, ga);
      g1 = _mm512_add_ps(g1, gb);
      q0 = _mm512_fmadd_ps(ga, xa, q0);
      q1 = _mm512_fmadd_ps(gb, xb, q1);
      _mm512_storeu_ps(g + j, ga);
      _mm512_storeu_ps(g + j + 16, gb);
      _mm512_storeu_ps(xh + j, xa);
      _mm512_storeu_ps(xh + j + 16, xb);
    }
    if (j < d) {
      const __m512 dya = _mm512_loadu_ps(dyr + j);
      const __m512 ga = _mm512_mul_ps(dya, _mm512_loadu_ps(m + j));
      const __m512 xa = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + j), mu), rs);
      if constexpr (kSums) add_sums(s0 + j, s1 + j, dya, xa);
      g0 = _mm512_add_ps(g0, ga);
      q0 = _mm512_fmadd_ps(ga, xa, q0);
      _mm512_storeu_ps(g + j, ga);
      _mm512_storeu_ps(xh + j, xa);
    }
    const __m512 c1 = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(g0, g1)) * inv_d);
    const __m512 c2 = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(q0, q1)) * inv_d);
    float* __restrict dxr = static_cast<float*>(a.dx) + r * a.ldx;
    const float* __restrict res = a.dres ? static_cast<const float*>(a.dres) + r * d : nullptr;
    for (int64_t k = 0; k < d; k += 16) {
      const __m512 t = _mm512_fnmadd_ps(_mm512_loadu_ps(xh + k), c2, _mm512_sub_ps(_mm512_loadu_ps(g + k), c1));
      _mm512_storeu_ps(dxr + k, _mm512_mul_ps(rs, t));
    }
    // As in the generic body, the add in a loop of its own: GCC would contract the product
    // above and this add into one fused multiply-add, and dx must be rounded first (the sum
    // must equal dx + res added outside).
    if (res)
      for (int64_t k = 0; k < d; k += 16)
        _mm512_storeu_ps(dxr + k, _mm512_add_ps(_mm512_loadu_ps(dxr + k), _mm512_loadu_ps(res + k)));
  }
}
MD_AVX512 void modln_dx_f32_avx512(const LnDx& a, int64_t r0, int64_t r1) { modln_dx_f32_avx512_rows<false>(a, r0, r1); }
// Samples b0..b1: their rows' dx and their sums.
MD_AVX512 void modln_dx_sums_f32_avx512(const LnDx& a, int64_t b0, int64_t b1) {
  modln_dx_f32_avx512_rows<true>(a, b0 * a.T, b1 * a.T);
}

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline x86-64.
int detected_isa() {
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return level;
}

std::atomic<int> g_isa_cap{2};  // limit_instruction_set()

int isa() { return std::min(detected_isa(), g_isa_cap.load(std::memory_order_relaxed)); }

// The instantiation of NAME_<isa><types...> for this CPU.
#define MD_PICK(NAME, ...) \
  (isa() == 2 ? &NAME##_avx512<__VA_ARGS__> : isa() == 1 ? &NAME##_avx2<__VA_ARGS__> : &NAME##_base<__VA_ARGS__>)

// Calls f with a null pointer of the C++ type for dtype t (float32 and bf16 on the CPU).
template <typename F> void with_type(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(static_cast<float*>(nullptr)); return;
    case DType::bf16: f(static_cast<bf16*>(nullptr)); return;
    case DType::f16: break;
  }
  throw std::runtime_error("fused CPU kernels: float32 and bf16 only");
}
template <typename F> void with_types(DType a, DType b, F&& f) {
  with_type(a, [&](auto* ap) { with_type(b, [&](auto* bp) { f(ap, bp); }); });
}
template <typename F> void with_types(DType a, DType b, DType c, F&& f) {
  with_types(a, b, [&](auto* ap, auto* bp) { with_type(c, [&](auto* cp) { f(ap, bp, cp); }); });
}
template <typename P> using elem = std::remove_pointer_t<P>;

// Pieces of at least this many elements for at::parallel_for, which runs on the calling thread
// (microdit is built without OpenMP; the CPU workers run whole kernels side by side).
constexpr int64_t kGrainElems = 32768;
int64_t grain(int64_t per_item) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(per_item, 1)); }

template <typename Args>
void run(void (*fn)(const Args&, int64_t, int64_t), const Args& a, int64_t n, int64_t per_item) {
  at::parallel_for(0, n, grain(per_item), [&](int64_t i0, int64_t i1) { fn(a, i0, i1); });
}

void check_sizes(int64_t rows, int64_t T, int64_t d) {
  if (rows <= 0 || T <= 0 || d <= 0 || rows % T != 0)
    throw std::runtime_error("fused CPU kernels: bad sizes (rows " + std::to_string(rows) + ", T " +
                             std::to_string(T) + ", d " + std::to_string(d) + ")");
}

}  // namespace

void limit_instruction_set(int level) { g_isa_cap = std::clamp(level, 0, 2); }

const char* instruction_set() {
  switch (isa()) {
    case 2: return "avx512";
    case 1: return "avx2";
    default: return "x86-64";
  }
}

bool float32_rows_apply(int64_t d) { return isa() == 2 && d > 0 && d % 16 == 0; }

void modln_forward(const void* x, int64_t ldx, DType xt, void* xs, DType st, const float* w,
                   const void* shift, const void* scale, void* y, DType yt, float* mean, float* rstd,
                   int64_t rows, int64_t T, int64_t d, float eps) {
  check_sizes(rows, T, d);
  const LnFwd a{x, ldx, xs, w, shift, scale, y, mean, rstd, T, d, eps};
  if (float32_rows_apply(d) && xt == DType::f32 && st == DType::f32 && yt == DType::f32) {
    run(&modln_fwd_f32_avx512, a, rows, d);
    return;
  }
  // Under bf16 autocast: a float32 (or bf16) x kept as it is, y and the modulation in bf16.
  if (float32_rows_apply(d) && st == xt && yt == DType::bf16 && (xt == DType::f32 || xt == DType::bf16)) {
    run(xt == DType::f32 ? &modln_fwd_avx512<float, bf16> : &modln_fwd_avx512<bf16, bf16>, a, rows, d);
    return;
  }
  with_types(xt, st, yt, [&](auto* xp, auto* sp, auto* yp) {
    run(MD_PICK(modln_fwd, elem<decltype(xp)>, elem<decltype(sp)>, elem<decltype(yp)>), a, rows, d);
  });
}

void layer_norm_in_place(float* x, int64_t ldx, const float* w, float* mean, float* rstd, int64_t rows, int64_t d,
                         float eps) {
  check_sizes(rows, rows, d);
  if (!float32_rows_apply(d) || ldx < d)
    throw std::runtime_error("fused CPU kernels: the in-place LayerNorm needs AVX-512, d a multiple of 16 and rows "
                             "at least d apart (d " + std::to_string(d) + ", row stride " + std::to_string(ldx) + ")");
  LnFwd a{x, ldx, nullptr, w, nullptr, nullptr, x, mean, rstd, rows, d, eps};
  a.ldy = ldx;
  run(&modln_fwd_f32_avx512, a, rows, d);
}

void residual_modln_forward(const float* x, const float* gate, const float* h, float* sum, const float* w,
                            const float* shift, const float* scale, float* y, float* mean, float* rstd,
                            int64_t rows, int64_t T, int64_t d, float eps) {
  check_sizes(rows, T, d);
  if (!float32_rows_apply(d))
    throw std::runtime_error("fused CPU kernels: the residual LayerNorm needs AVX-512 and d a multiple of 16 (d " +
                             std::to_string(d) + ")");
  LnFwd a{x, d, nullptr, w, shift, scale, y, mean, rstd, T, d, eps};
  a.res_h = h;
  a.res_gate = gate;
  a.res_out = sum;
  run(&modln_fwd_f32_avx512, a, rows, d);
}

void modln_backward_dx(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                       const float* w, const void* scale, const float* mean, const float* rstd,
                       void* dx, int64_t ldx, DType xt, const void* dres, int64_t rows, int64_t T, int64_t d) {
  check_sizes(rows, T, d);
  if (ldx < d) throw std::runtime_error("fused CPU kernels: dx row stride below d");
  const LnDx a{dy, xs, lds, w, scale, mean, rstd, dx, ldx, dres, T, d};
  if (float32_rows_apply(d) && xt == DType::f32 && st == DType::f32 && yt == DType::f32) {
    run(&modln_dx_f32_avx512, a, rows, d);
    return;
  }
  with_types(xt, st, yt, [&](auto* xp, auto* sp, auto* yp) {
    run(MD_PICK(modln_dx, elem<decltype(xp)>, elem<decltype(sp)>, elem<decltype(yp)>), a, rows, d);
  });
}

void modln_backward_sums(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                         const float* mean, const float* rstd, float* s0, float* s1, int64_t B,
                         int64_t T, int64_t d) {
  check_sizes(B * T, T, d);
  const LnSums a{dy, xs, lds, mean, rstd, s0, s1, T, d};
  with_types(st, yt, [&](auto* sp, auto* yp) {
    run(MD_PICK(modln_sums, elem<decltype(sp)>, elem<decltype(yp)>), a, B, T * d);
  });
}

void modln_backward_dx_sums(const void* dy, DType yt, const void* xs, int64_t lds, DType st, const float* w,
                            const void* scale, const float* mean, const float* rstd, void* dx, int64_t ldx,
                            DType xt, const void* dres, float* s0, float* s1, int64_t B, int64_t T, int64_t d) {
  if (!(float32_rows_apply(d) && xt == DType::f32 && st == DType::f32 && yt == DType::f32)) {
    modln_backward_dx(dy, yt, xs, lds, st, w, scale, mean, rstd, dx, ldx, xt, dres, B * T, T, d);
    modln_backward_sums(dy, yt, xs, lds, st, mean, rstd, s0, s1, B, T, d);
    return;
  }
  check_sizes(B * T, T, d);
  if (ldx < d) throw std::runtime_error("fused CPU kernels: dx row stride below d");
  LnDx a{dy, xs, lds, w, scale, mean, rstd, dx, ldx, dres, T, d};
  a.s0 = s0;
  a.s1 = s1;
  run(&modln_dx_sums_f32_avx512, a, B, T * d);  // whole samples to each thread: their sums are theirs
}

void swiglu_forward(const void* u, const void* v, void* p, DType t, int64_t n) {
  if (n < 0) throw std::runtime_error("fused CPU kernels: bad size " + std::to_string(n));
  const Swiglu a{nullptr, u, v, p, nullptr};
  with_type(t, [&](auto* tp) { run(MD_PICK(swiglu_fwd, elem<decltype(tp)>), a, n, 1); });
}

void swiglu_backward(const void* dp, const void* u, const void* v, void* du, void* dv, DType t,
                     int64_t n) {
  if (n < 0) throw std::runtime_error("fused CPU kernels: bad size " + std::to_string(n));
  const Swiglu a{dp, u, v, du, dv};
  with_type(t, [&](auto* tp) { run(MD_PICK(swiglu_bwd, elem<decltype(tp)>), a, n, 1); });
}

void gated_residual_forward(const void* x, DType xt, const void* gate, DType gt, const void* h,
                            DType ht, void* out, int64_t B, int64_t T, int64_t d) {
  check_sizes(B * T, T, d);
  const Gated a{x, gate, h, out, nullptr, T, d};
  with_types(xt, gt, ht, [&](auto* xp, auto* gp, auto* hp) {
    run(MD_PICK(gated_fwd, elem<decltype(xp)>, elem<decltype(gp)>, elem<decltype(hp)>), a, B * T, d);
  });
}

void gated_residual_backward(const void* dout, DType ot, const void* gate, DType gt, const void* h,
                             DType ht, void* dh, float* dgate, int64_t B, int64_t T, int64_t d) {
  check_sizes(B * T, T, d);
  const Gated a{dout, gate, h, dh, dgate, T, d};
  with_types(ot, gt, ht, [&](auto* op, auto* gp, auto* hp) {
    run(MD_PICK(gated_bwd, elem<decltype(op)>, elem<decltype(gp)>, elem<decltype(hp)>), a, B, T * d);
  });
}

void moe_scatter_sum(const void* src, DType st, const float* w, const int32_t* inv, void* dst, DType dt,
                     int64_t B, int64_t T, int64_t E, int64_t k, int64_t d) {
  if (B <= 0 || T <= 0 || E <= 0 || E > 64 || k <= 0 || d <= 0)
    throw std::runtime_error("fused CPU kernels: bad expert sum sizes (B " + std::to_string(B) + ", T " +
                             std::to_string(T) + ", E " + std::to_string(E) + ", k " + std::to_string(k) +
                             ", d " + std::to_string(d) + ")");
  const MoeSum a{src, w, inv, dst, B, T, E, k, d};
  with_types(st, dt, [&](auto* sp, auto* dp) {
    run(MD_PICK(moe_sum, elem<decltype(sp)>, elem<decltype(dp)>), a, B * T, E * d);
  });
}

}  // namespace microdit::kernels::cpu
