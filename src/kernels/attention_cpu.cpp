// bf16 attention's backward pass on AMX (kernels/attention_cpu.h). One (batch, head) at a time:
// its rows are copied into padded bf16 buffers, the five products run through oneDNN's brgemm
// (ATen's at::native::cpublas, the same entry point as ATen's AMX attention forward), and one
// vectorized pass over the (N, L) scores turns S and dP into P and dS.
#include "kernels/attention_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu_math.h"

namespace microdit::kernels::cpu {

namespace {

namespace cb = at::native::cpublas;
using u16 = uint16_t;  // a bf16 value's bits

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

// One (batch, head)'s softmax gradient on the transposed (L, Nc) score matrices, key rows j < L
// (query columns past N are padding and get zeros):
//   p = exp(scale s - lse[i]),  P^T = bf16(p),  dS^T = bf16(p (dp - D[i])).
// AMX CPUs all have AVX-512: this one function is compiled for it.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void softmax_backward_rows(
    const float* ST, const float* dPT, const float* lse, const float* D, int64_t L, int64_t N, int64_t Nc,
    float scale, u16* PT, u16* dST) {
  for (int64_t j = 0; j < L; ++j) {
    const float* __restrict s = ST + j * Nc;
    const float* __restrict dp = dPT + j * Nc;
    const float* __restrict m = lse;
    const float* __restrict d = D;
    u16* __restrict p_out = PT + j * Nc;
    u16* __restrict ds_out = dST + j * Nc;
    for (int64_t i = 0; i < N; ++i) {
      const float p = exp_poly(s[i] * scale - m[i]);
      p_out[i] = float_to_bf16_bits(p);
      ds_out[i] = float_to_bf16_bits(p * (dp[i] - d[i]));
    }
    for (int64_t i = N; i < Nc; ++i) p_out[i] = ds_out[i] = 0;
  }
}

// The scratch of one thread, sized for one head. Padding (rows past N or L, columns past N or
// L) is zeroed once here and never written.
struct Scratch {
  std::vector<u16> q, qt, dout, doutt, k, kt, v, pt, dst, packed;
  std::vector<float> st, dpt, d, lse, dqt, dk, dv;
  Scratch(int64_t N, int64_t Nc, int64_t L, int64_t Lk, int64_t hd)
      : q(Nc * hd, 0), qt(hd * Nc, 0), dout(Nc * hd, 0), doutt(hd * Nc, 0), k(L * hd), kt(hd * Lk, 0), v(L * hd),
        pt(Lk * Nc, 0), dst(Lk * Nc, 0), packed(std::max({hd, Nc, Lk}) * kColumnBlock), st(L * Nc), dpt(L * Nc),
        d(N), lse(N), dqt(hd * Nc), dk(L * hd), dv(L * hd) {}
};

// dst (cols x rows, row stride ldd) = src (rows x cols, contiguous) transposed, in 16 x 16 tiles;
// cols is a multiple of 16. Inlined into backward_head.
inline __attribute__((always_inline)) void transpose(const u16* __restrict src, int64_t rows, int64_t cols,
                                                    u16* __restrict dst, int64_t ldd) {
  constexpr int64_t t = 16;
  u16 tile[t][t];
  for (int64_t r0 = 0; r0 < rows; r0 += t) {
    const int64_t nr = std::min(t, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += t) {
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < t; ++c) tile[c][r] = src[(r0 + r) * cols + c0 + c];
      for (int64_t c = 0; c < t; ++c)
        for (int64_t r = 0; r < nr; ++r) dst[(c0 + c) * ldd + r0 + r] = tile[c][r];
    }
  }
}

// One call's tensors: row i of head (b, h) of x starts at x + b * s0 + h * s1 + i * s2.
struct Operand {
  const u16* p;
  int64_t s0, s1, s2;
  const u16* row(int64_t b, int64_t h, int64_t i) const { return p + b * s0 + h * s1 + i * s2; }
};
struct Args {
  Operand q, k, v, out, dout;
  const float* lse;
  int64_t lse_s0, lse_s1, lse_s2;
  u16 *dq, *dk, *dv;  // (B, seq, H, hd) contiguous
  int64_t H, N, L, hd, Nc, Lk;
  float scale;
};

// The gradients of head (b, h). Compiled for AVX-512 (every AMX CPU has it) so that the copies
// and conversions around the products vectorize.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void backward_head(const Args& a, Scratch& x,
                                                                                            int64_t b, int64_t h) {
  const int64_t N = a.N, L = a.L, hd = a.hd, Nc = a.Nc, Lk = a.Lk;
  for (int64_t i = 0; i < N; ++i) {  // q, dO, D = rowsum(dO o), lse
    const u16 *__restrict qr = a.q.row(b, h, i), *__restrict gr = a.dout.row(b, h, i),
                          *__restrict orow = a.out.row(b, h, i);
    u16 *__restrict qs = &x.q[i * hd], *__restrict gs = &x.dout[i * hd];
    float acc[16] = {};
    for (int64_t c = 0; c < hd; c += 16)  // hd is a multiple of 16
      for (int64_t l = 0; l < 16; ++l) {
        qs[c + l] = qr[c + l];
        gs[c + l] = gr[c + l];
        acc[l] += bf16_bits_to_float(gr[c + l]) * bf16_bits_to_float(orow[c + l]);
      }
    float sum = 0.f;
    for (int64_t l = 0; l < 16; ++l) sum += acc[l];
    x.d[i] = sum;
    x.lse[i] = a.lse[b * a.lse_s0 + h * a.lse_s1 + i * a.lse_s2];
  }
  for (int64_t j = 0; j < L; ++j) {  // k, v
    const u16 *__restrict kr = a.k.row(b, h, j), *__restrict vr = a.v.row(b, h, j);
    u16 *__restrict ks = &x.k[j * hd], *__restrict vs = &x.v[j * hd];
    for (int64_t c = 0; c < hd; ++c) {
      ks[c] = kr[c];
      vs[c] = vr[c];
    }
  }
  transpose(x.q.data(), N, hd, x.qt.data(), Nc);      // q^T  (hd, Nc)
  transpose(x.dout.data(), N, hd, x.doutt.data(), Nc);  // dO^T (hd, Nc)
  transpose(x.k.data(), L, hd, x.kt.data(), Lk);      // k^T  (hd, Lk)
  u16* pk = x.packed.data();
  gemm(L, Nc, hd, x.k.data(), hd, x.qt.data(), Nc, x.st.data(), Nc, pk);      // S^T = k q^T     (L, Nc)
  gemm(L, Nc, hd, x.v.data(), hd, x.doutt.data(), Nc, x.dpt.data(), Nc, pk);  // dP^T = v dO^T   (L, Nc)
  softmax_backward_rows(x.st.data(), x.dpt.data(), x.lse.data(), x.d.data(), L, N, Nc, a.scale, x.pt.data(),
                        x.dst.data());
  gemm(L, hd, Nc, x.pt.data(), Nc, x.dout.data(), hd, x.dv.data(), hd, pk);   // dV = P^T dO     (L, hd)
  gemm(L, hd, Nc, x.dst.data(), Nc, x.q.data(), hd, x.dk.data(), hd, pk);     // dK = dS^T q     (L, hd)
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

void check(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error("CPU bf16 attention backward: " + what);
}

}  // namespace

bool amx_attention_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-bf16") != 0 && at::cpu::init_amx() && cb::could_pack(at::kBFloat16);
  }();
  return ok;
}

bool amx_attention_applies(int64_t head_dim) { return head_dim > 0 && head_dim % 16 == 0 && head_dim <= 256; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_bf16(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& out,
                                                                       const at::Tensor& lse, const at::Tensor& dout,
                                                                       double scale) {
  check(amx_attention_available(), "this CPU has no AMX for bf16");
  check(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && out.sizes() == q.sizes() && dout.sizes() == q.sizes() &&
            k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
        "q, out, dout must be (B, H, N, hd) and k, v (B, H, L, hd)");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), hd = q.size(3);
  check(amx_attention_applies(hd), "head size " + std::to_string(hd) + " is not a multiple of 16 up to 256");
  check(N > 0 && L > 0, "empty sequence");
  for (const at::Tensor* t : {&q, &k, &v, &out, &dout})
    check(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->stride(3) == 1,
          "q, k, v, out and dout must be bf16 CPU tensors with contiguous rows");
  check(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == B &&
            lse.size(1) == H && lse.size(2) == N,
        "lse must be float32 (B, H, N)");

  const int64_t Nc = round_up(N, 16), Lk = round_up(L, 2);
  const auto opts = q.options().memory_format(c10::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty({B, N, H, hd}, opts), dk = at::empty({B, L, H, hd}, opts),
             dv = at::empty({B, L, H, hd}, opts);  // (B, seq, H, hd): the products' layout
  auto operand = [](const at::Tensor& t) {
    return Operand{reinterpret_cast<const u16*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
  };
  const Args args{operand(q), operand(k), operand(v), operand(out), operand(dout),
                  lse.data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2),
                  reinterpret_cast<u16*>(dq.data_ptr()), reinterpret_cast<u16*>(dk.data_ptr()),
                  reinterpret_cast<u16*>(dv.data_ptr()), H, N, L, hd, Nc, Lk, static_cast<float>(scale)};
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    Scratch x(N, Nc, L, Lk, hd);
    for (int64_t w = w0; w < w1; ++w) backward_head(args, x, w / H, w % H);
    cb::brgemm_release();
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

}  // namespace microdit::kernels::cpu
