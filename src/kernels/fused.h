// Fused CUDA kernels for the elementwise chains around MicroDiT's matmuls, which LibTorch runs as
// several memory-bound kernels each (docs/performance.md, "Where the time goes"):
//   modulated LayerNorm  y = LN(x) * w * (1 + scale[b]) + shift[b]   (one pass instead of 3-5)
//   gated residual add   out = x + gate[b] * h                        (one pass instead of 2)
// and their backward passes. Plain C++ interface (raw pointers, a cudaStream_t as void*), so
// this header and the .cu file need no LibTorch; model/fused.cpp wraps them as autograd
// functions. Every tensor is row-major: rows r = b * T + t of width d, sample b = r / T.
// The CUDA kernels are compiled only when CMake finds nvcc (MICRODIT_HAVE_CUDA_KERNELS);
// `available()` says so. The same functions for CPU memory, in `kernels::cpu` below
// (kernels/fused_cpu.cpp, float32 and bf16), are always there.
#pragma once
#include <cstdint>

namespace microdit::kernels {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// True when the kernels were compiled into this binary.
bool available();

// Which CUDA kernels the LayerNorm forward and dx and the gated residual forward take:
//   true (the default): one warp per row with 16-byte loads and the row kept in registers,
//     32-bit indices, where the shapes allow it (d a multiple of 16 bytes' worth of the widest
//     type, 4 or 8 elements; at most 256 such vectors, so d <= 2048 when every tensor is 16-bit
//     and d <= 1024 when one is float32; 16-byte aligned pointers; else the block kernels).
//     On an H200 (session 14, XL batch 256, mask 0.75, bf16) a training step took 229 ms with
//     them against 253 ms with the block kernels; 30-step sampling 5.1 s against 6.2 s;
//   false (`--fused-kernels block`): one block of 64-256 threads per row, scalar loads, three
//     passes, for any shape.
void set_warp_row_kernels(bool on);
bool warp_row_kernels();
// How many warp-per-row kernels this process has launched: tests check that a shape took them.
int64_t warp_row_launches();

// Forward of the (modulated) LayerNorm over the last dimension d.
//   x: rows x d, row stride ldx, dtype xt. Statistics are taken over x rounded to st.
//   xs: when not null, receives x rounded to st (rows x d, contiguous) for the backward pass.
//   w: (d) float32 or null (no affine weight). shift, scale: (B, d) in yt, or both null.
//   y: rows x d contiguous in yt. mean, rstd: (rows) float32.
void modln_forward(const void* x, int64_t ldx, DType xt, void* xs, DType st, const float* w,
                   const void* shift, const void* scale, void* y, DType yt, float* mean, float* rstd,
                   int64_t rows, int64_t T, int64_t d, float eps, void* stream);

// dx from dy (rows x d contiguous, yt) and the saved input xs (row stride lds, dtype st):
//   g = dy * (1 + scale[b]) * w;  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
// dx: rows x d with row stride ldx (>= d) in xt. When dres (rows x d contiguous, xt) is not
// null, dx = round(dx) + dres, rounded: the sum autograd would take of the LayerNorm's input
// gradient and another gradient of the same input (the residual stream's), in one pass.
void modln_backward_dx(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                       const float* w, const void* scale, const float* mean, const float* rstd,
                       void* dx, int64_t ldx, DType xt, const void* dres, int64_t rows, int64_t T, int64_t d,
                       void* stream);

// Per-sample column sums for the parameter gradients (s0, s1: (B, d) float32, zeroed by the
// caller): s0[b, j] = sum_t dy[b, t, j], s1[b, j] = sum_t dy[b, t, j] * xhat[b, t, j].
void modln_backward_sums(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                         const float* mean, const float* rstd, float* s0, float* s1, int64_t B,
                         int64_t T, int64_t d, void* stream);

// out = x + gate[b] * h; x, out in xt; gate (B, d) in gt; h in ht; all contiguous.
void gated_residual_forward(const void* x, DType xt, const void* gate, DType gt, const void* h,
                            DType ht, void* out, int64_t B, int64_t T, int64_t d, void* stream);

// dh = dout * gate[b] (in ht); dgate[b, j] += sum_t dout * h (float32, zeroed by the caller).
void gated_residual_backward(const void* dout, DType ot, const void* gate, DType gt, const void* h,
                             DType ht, void* dh, float* dgate, int64_t B, int64_t T, int64_t d,
                             void* stream);

// SwiGLU's elementwise part over n values, u, v and the results all of dtype t (u and v are
// the two input projections w1 x and w2 x):
//   forward:  p = silu(u) * v, silu(u) = u * sigmoid(u);
//   backward: du = dp * v * silu'(u) with silu'(u) = s (1 + u (1 - s)), s = sigmoid(u),
//             dv = dp * silu(u).
// LibTorch runs them as 2 and 3 kernels (silu, mul; mul, silu_backward, mul) that round silu(u)
// and dp * v to t between them; these round once, at the store.
void swiglu_forward(const void* u, const void* v, void* p, DType t, int64_t n, void* stream);
void swiglu_backward(const void* dp, const void* u, const void* v, void* du, void* dv, DType t,
                     int64_t n, void* stream);

// Expert-choice routing's sums (model/ffn.cpp, the gather dispatch): for each token row (b, t),
//   dst[b, t, :] = sum over experts e in 0..E-1 with slot s = inv[b, t, e] >= 0 of
//                  round_dt(w[b, e, s] * src[e, b, s, :])      (w null: round_dt(src[e, b, s, :])),
// summed in float32 in expert order and rounded to dt; a row no expert picked is zero. The
// combine (src the experts' output, w the router weights) and the backward pass of the gather
// of the picked tokens (src their gradient, w null): each output row summed by one thread
// block, with no atomics, so the same inputs give the same bits every time.
// src (E, B, k, d) contiguous in st; w (B, E, k) float32 or null; inv (B, T, E) int32 (-1 or a
// slot in [0, k)); dst (B, T, d) contiguous in dt. E <= 64.
void moe_scatter_sum(const void* src, DType st, const float* w, const int32_t* inv, void* dst, DType dt,
                     int64_t B, int64_t T, int64_t E, int64_t k, int64_t d, void* stream);

// The same kernels on the CPU: same arguments and arithmetic, no stream, float32 and bf16 only
// (f16 throws). They run on LibTorch's intra-op threads, vectorized for the widest instruction
// set the CPU has.
namespace cpu {

// "avx512", "avx2" or "x86-64": the instruction set the CPU kernels run with here.
const char* instruction_set();
// For tests: use at most this level (2: AVX-512, 1: AVX2, 0: x86-64), so each compiled
// version can be checked on one machine. The default is 2 (the widest the CPU has).
void limit_instruction_set(int level);

void modln_forward(const void* x, int64_t ldx, DType xt, void* xs, DType st, const float* w,
                   const void* shift, const void* scale, void* y, DType yt, float* mean, float* rstd,
                   int64_t rows, int64_t T, int64_t d, float eps);
// Inference only, float32: sum = x + gate[b] * h (x + h when gate is null), and y = the modulated
// LayerNorm of sum as modln_forward computes it (w, shift, scale may be null), in one pass
// over the rows. x, h, sum, y (rows, d) contiguous, gate, shift, scale (rows / T, d).
// float32_rows_apply(d) says whether this CPU and width can run it (AVX-512, d % 16 == 0); float32
// modln_forward and modln_backward_dx take the same AVX-512 kernels there.
bool float32_rows_apply(int64_t d);
void residual_modln_forward(const float* x, const float* gate, const float* h, float* sum, const float* w,
                            const float* shift, const float* scale, float* y, float* mean, float* rstd,
                            int64_t rows, int64_t T, int64_t d, float eps);
// Inference only, float32: rows of x (row stride ldx >= d) normalised in place, times w where
// given, as modln_forward computes them. float32_rows_apply(d) says where it runs.
void layer_norm_in_place(float* x, int64_t ldx, const float* w, float* mean, float* rstd, int64_t rows, int64_t d,
                         float eps);
void modln_backward_dx(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                       const float* w, const void* scale, const float* mean, const float* rstd,
                       void* dx, int64_t ldx, DType xt, const void* dres, int64_t rows, int64_t T, int64_t d);
void modln_backward_sums(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                         const float* mean, const float* rstd, float* s0, float* s1, int64_t B,
                         int64_t T, int64_t d);
// Both: dx as modln_backward_dx (rows = B T) and the sums as modln_backward_sums (s0, s1 zeroed
// by the caller), the same values, in one pass over dy and xs where float32_rows_apply(d) and
// every dtype is float32 (otherwise the two passes).
void modln_backward_dx_sums(const void* dy, DType yt, const void* xs, int64_t lds, DType st, const float* w,
                            const void* scale, const float* mean, const float* rstd, void* dx, int64_t ldx,
                            DType xt, const void* dres, float* s0, float* s1, int64_t B, int64_t T, int64_t d);
// sigmoid through a polynomial exp that vectorizes (Cephes' expf, about 1 ulp), its argument
// clamped to [-87, 88]: that moves silu(u) by less than 1e-35.
void swiglu_forward(const void* u, const void* v, void* p, DType t, int64_t n);
void swiglu_backward(const void* dp, const void* u, const void* v, void* du, void* dv, DType t,
                     int64_t n);
void gated_residual_forward(const void* x, DType xt, const void* gate, DType gt, const void* h,
                            DType ht, void* out, int64_t B, int64_t T, int64_t d);
void gated_residual_backward(const void* dout, DType ot, const void* gate, DType gt, const void* h,
                             DType ht, void* dh, float* dgate, int64_t B, int64_t T, int64_t d);
void moe_scatter_sum(const void* src, DType st, const float* w, const int32_t* inv, void* dst, DType dt,
                     int64_t B, int64_t T, int64_t E, int64_t k, int64_t d);

}  // namespace cpu

}  // namespace microdit::kernels
