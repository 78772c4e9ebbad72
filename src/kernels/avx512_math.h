// Functions of 16 floats for the AVX-512 kernels (kernels/attention_cpu.cpp,
// kernels/gemm_cpu.cpp), inlined into callers compiled for AVX-512 F/BW/VL/DQ and FMA.
#pragma once
#include <immintrin.h>

#include "kernels/cpu_math.h"

namespace microdit::kernels::cpu {

#define MD_AVX512_MATH inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// exp of 16 floats: exp_poly's Cephes polynomial (kernels/cpu_math.h) with fused multiply-adds.
MD_AVX512_MATH __m512 exp16(__m512 x) {
  using E = ExpPoly;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(E::lo)), _mm512_set1_ps(E::hi));
  const __m512 round = _mm512_set1_ps(E::round);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(E::log2e), round);
  const __m512 n = _mm512_sub_ps(t, round);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(E::ln2_hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(E::ln2_lo), r);
  __m512 p = _mm512_set1_ps(E::c[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(E::c[i]));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);  // p 2^n in one operation (exact: the same values as 2^n's bits times p)
}

// 2^x of 16 floats for x <= 0 (softmax's exponent in base 2: the caller folds log2 e into its
// scale): n = round(x), 2^(x - n) by a polynomial of degree 6 on [-1/2, 1/2] fitted by microdit
// (`tools/fit_exp2.py 6`: relative error 7.9e-8 in float32, exp16's order), times 2^n. 10 operations
// where exp16 takes 15; x is clamped below at -127 (2^-127: a term a softmax row's sum of at least
// 1 does not see).
MD_AVX512_MATH __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.0f));
  const __m512 round = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(x, round), round);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5353267372120172e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398858718574047e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437848985195e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503323674201965e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022647738456726e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Phi(x) = (1 + erf(x / sqrt 2)) / 2, the standard normal CDF, and exp(-x^2 / 2) in `gauss`.
// erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), as ATen's vectorised erf:
// erf(z) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p z), z >= 0.
MD_AVX512_MATH __m512 normal_cdf16(__m512 x, __m512& gauss) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  // t = 1 / (1 + p z): the 14-bit reciprocal and one Newton step (relative error ~1e-8; a
  // division costs several times more).
  const __m512 den = _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
  __m512 t = _mm512_rcp14_ps(den);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));
  __m512 q = _mm512_set1_ps(1.061405429f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.453152027f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.421413741f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.284496736f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.254829592f));
  gauss = exp16(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.5f)));
  const __m512 erfc_half = _mm512_mul_ps(_mm512_mul_ps(q, t), _mm512_mul_ps(gauss, _mm512_set1_ps(0.5f)));  // (1 - erf(z)) / 2
  // x >= 0: 1 - erfc_half; x < 0: erfc_half.
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.0f), erfc_half), erfc_half);
}

// erf(z) of 16 floats without exp: z P(z^2) / Q(z^2) on z clamped to [-4, 4] (erf(4) is 1 in
// float32), P of degree 6 and Q of degree 5 fitted by microdit (`tools/fit_erf.py 4.0 6 5`: weighted
// least squares iterated towards the minimax error). Absolute error below 3e-7 evaluated in
// float32 (A&S 7.1.26 above: 1.5e-7 before rounding), in 22 operations instead of 35.
MD_AVX512_MATH __m512 erf_rational16(__m512 z) {
  z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
  const __m512 t = _mm512_mul_ps(z, z);
  __m512 p = _mm512_set1_ps(-1.3666642928455985e-08f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(4.7805137910472695e-06f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(3.826912143267691e-04f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(3.839523531496525e-03f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(5.4332565516233444e-02f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.847102791070938e-01f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.128379225730896f));
  __m512 q = _mm512_set1_ps(6.400902930181473e-05f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.309576560743153e-03f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.5453501604497433e-02f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.1382625997066498e-01f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(4.9702876806259155e-01f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.0f));
  // 1 / Q: the 14-bit reciprocal and one Newton step (Q >= 1).
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  return _mm512_mul_ps(_mm512_mul_ps(z, p), r);
}

// GELU (the exact form, x Phi(x), LibTorch's default) of 16 floats: Phi(x) = (1 + erf(x / sqrt 2)) / 2.
MD_AVX512_MATH __m512 gelu16(__m512 x) {
  const __m512 e = erf_rational16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
  return _mm512_mul_ps(x, _mm512_fmadd_ps(e, _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f)));
}

// GELU's derivative, Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi), of 16 floats.
MD_AVX512_MATH __m512 gelu_grad16(__m512 x) {
  __m512 gauss;
  const __m512 cdf = normal_cdf16(x, gauss);
  return _mm512_fmadd_ps(_mm512_mul_ps(x, gauss), _mm512_set1_ps(0.39894228040143268f), cdf);
}

}  // namespace microdit::kernels::cpu
