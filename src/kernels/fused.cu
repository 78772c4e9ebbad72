// Fused CUDA kernels (kernels/fused.h). All arithmetic is float32; loads and stores convert.
#include "kernels/fused.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

namespace microdit::kernels {

bool available() { return true; }

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// v rounded to T's precision, as float.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* shared /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One block per row.
template <typename X, typename S, typename Y>
__global__ void modln_fwd_kernel(const X* __restrict__ x, int64_t ldx, S* __restrict__ xs,
                                 const float* __restrict__ w, const Y* __restrict__ shift,
                                 const Y* __restrict__ scale, Y* __restrict__ y,
                                 float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t T,
                                 int d, float eps) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x, b = r / T;
  const X* xr = x + r * ldx;
  float s = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) s += round_to<S>(to_f(xr[j]));
  const float mean = block_sum(s, shared) / d;
  float q = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float c = round_to<S>(to_f(xr[j])) - mean;
    q += c * c;
  }
  const float rstd = rsqrtf(block_sum(q, shared) / d + eps);
  Y* yr = y + r * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = round_to<S>(to_f(xr[j]));
    if (xs) xs[r * d + j] = from_f<S>(v);
    float o = (v - mean) * rstd;
    if (w) o *= w[j];
    if (scale) o = o * (1.f + to_f(scale[b * d + j])) + to_f(shift[b * d + j]);
    yr[j] = from_f<Y>(o);
  }
  if (threadIdx.x == 0) {
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

// One block per row.
template <typename X, typename S, typename Y>
__global__ void modln_bwd_dx_kernel(const Y* __restrict__ dy, const S* __restrict__ xs, int64_t lds,
                                    const float* __restrict__ w, const Y* __restrict__ scale,
                                    const float* __restrict__ mean, const float* __restrict__ rstd,
                                    X* __restrict__ dx, int64_t T, int d) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x, b = r / T;
  const Y* dyr = dy + r * d;
  const S* xr = xs + r * lds;
  const float mu = mean[r], rs = rstd[r];
  auto g_at = [&](int j) {
    float g = to_f(dyr[j]);
    if (scale) g *= 1.f + to_f(scale[b * d + j]);
    if (w) g *= w[j];
    return g;
  };
  float s1 = 0.f, s2 = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float g = g_at(j), xhat = (to_f(xr[j]) - mu) * rs;
    s1 += g;
    s2 += g * xhat;
  }
  const float c1 = block_sum(s1, shared) / d;
  const float c2 = block_sum(s2, shared) / d;
  X* dxr = dx + r * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float xhat = (to_f(xr[j]) - mu) * rs;
    dxr[j] = from_f<X>(rs * (g_at(j) - c1 - xhat * c2));
  }
}

// Tokens per thread of the column kernels: 32, or more where T / 32 would pass grid.z's limit.
int64_t rows_per_chunk(int64_t T) { return T / 32 < 65535 ? 32 : (T + 65534) / 65535; }

// Thread per (b, column j, chunk of `chunk` tokens); atomics add the chunks.
template <typename S, typename Y>
__global__ void modln_bwd_sums_kernel(const Y* __restrict__ dy, const S* __restrict__ xs,
                                      int64_t lds, const float* __restrict__ mean,
                                      const float* __restrict__ rstd, float* __restrict__ s0,
                                      float* __restrict__ s1, int64_t T, int d, int64_t chunk) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int64_t b = blockIdx.y;
  const int64_t t0 = int64_t(blockIdx.z) * chunk;
  const int64_t t1 = t0 + chunk < T ? t0 + chunk : T;
  float a0 = 0.f, a1 = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r = b * T + t;
    const float g = to_f(dy[r * d + j]);
    a0 += g;
    a1 += g * (to_f(xs[r * lds + j]) - mean[r]) * rstd[r];
  }
  atomicAdd(s0 + b * d + j, a0);
  atomicAdd(s1 + b * d + j, a1);
}

template <typename X, typename G, typename H>
__global__ void gated_fwd_kernel(const X* __restrict__ x, const G* __restrict__ gate,
                                 const H* __restrict__ h, X* __restrict__ out, int64_t n, int64_t T,
                                 int d) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / d, j = i - row * d, b = row / T;
    out[i] = from_f<X>(to_f(x[i]) + to_f(gate[b * d + j]) * to_f(h[i]));
  }
}

template <typename O, typename G, typename H>
__global__ void gated_bwd_kernel(const O* __restrict__ dout, const G* __restrict__ gate,
                                 const H* __restrict__ h, H* __restrict__ dh,
                                 float* __restrict__ dgate, int64_t T, int d, int64_t chunk) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int64_t b = blockIdx.y;
  const int64_t t0 = int64_t(blockIdx.z) * chunk;
  const int64_t t1 = t0 + chunk < T ? t0 + chunk : T;
  const float gj = to_f(gate[b * d + j]);
  float acc = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i = (b * T + t) * d + j;
    const float g = to_f(dout[i]);
    dh[i] = from_f<H>(g * gj);
    acc += g * to_f(h[i]);
  }
  atomicAdd(dgate + b * d + j, acc);
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA kernel ") + what + " failed: " + cudaGetErrorString(e));
}

// Calls f with a null pointer of the C++ type for dtype t.
template <typename F> void with_type(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(static_cast<float*>(nullptr)); return;
    case DType::bf16: f(static_cast<__nv_bfloat16*>(nullptr)); return;
    case DType::f16: f(static_cast<__half*>(nullptr)); return;
  }
  throw std::runtime_error("fused kernels: unsupported dtype");
}

// f(X*, Y*) or f(X*, Y*, Z*) with null pointers of the C++ types for the given dtypes.
template <typename F> void with_types(DType a, DType b, F&& f) {
  with_type(a, [&](auto* ap) { with_type(b, [&](auto* bp) { f(ap, bp); }); });
}
template <typename F> void with_types(DType a, DType b, DType c, F&& f) {
  with_types(a, b, [&](auto* ap, auto* bp) { with_type(c, [&](auto* cp) { f(ap, bp, cp); }); });
}

template <typename P> using elem = std::remove_pointer_t<P>;

int row_threads(int64_t d) { return d <= 256 ? 64 : d <= 1024 ? 128 : 256; }

dim3 column_grid(int64_t B, int64_t T, int64_t d, int threads) {
  return dim3(static_cast<unsigned>((d + threads - 1) / threads), static_cast<unsigned>(B),
              static_cast<unsigned>((T + rows_per_chunk(T) - 1) / rows_per_chunk(T)));
}

void check_sizes(int64_t rows, int64_t T, int64_t d) {
  if (rows <= 0 || T <= 0 || d <= 0 || d > (int64_t(1) << 30) || rows % T != 0 || rows / T > 65535)
    throw std::runtime_error("fused kernels: bad sizes (rows " + std::to_string(rows) + ", T " +
                             std::to_string(T) + ", d " + std::to_string(d) + ")");
}

}  // namespace

void modln_forward(const void* x, int64_t ldx, DType xt, void* xs, DType st, const float* w,
                   const void* shift, const void* scale, void* y, DType yt, float* mean, float* rstd,
                   int64_t rows, int64_t T, int64_t d, float eps, void* stream) {
  check_sizes(rows, T, d);
  with_types(xt, st, yt, [&](auto* xp, auto* sp, auto* yp) {
    using X = elem<decltype(xp)>;
    using S = elem<decltype(sp)>;
    using Y = elem<decltype(yp)>;
    modln_fwd_kernel<X, S, Y><<<static_cast<unsigned>(rows), row_threads(d), 0,
                                static_cast<cudaStream_t>(stream)>>>(
        static_cast<const X*>(x), ldx, static_cast<S*>(xs), w, static_cast<const Y*>(shift),
        static_cast<const Y*>(scale), static_cast<Y*>(y), mean, rstd, T, static_cast<int>(d), eps);
  });
  check_launch("modulated LayerNorm forward");
}

void modln_backward_dx(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                       const float* w, const void* scale, const float* mean, const float* rstd,
                       void* dx, DType xt, int64_t rows, int64_t T, int64_t d, void* stream) {
  check_sizes(rows, T, d);
  with_types(xt, st, yt, [&](auto* xp, auto* sp, auto* yp) {
    using X = elem<decltype(xp)>;
    using S = elem<decltype(sp)>;
    using Y = elem<decltype(yp)>;
    modln_bwd_dx_kernel<X, S, Y><<<static_cast<unsigned>(rows), row_threads(d), 0,
                                   static_cast<cudaStream_t>(stream)>>>(
        static_cast<const Y*>(dy), static_cast<const S*>(xs), lds, w,
        static_cast<const Y*>(scale), mean, rstd, static_cast<X*>(dx), T, static_cast<int>(d));
  });
  check_launch("modulated LayerNorm backward (dx)");
}

void modln_backward_sums(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                         const float* mean, const float* rstd, float* s0, float* s1, int64_t B,
                         int64_t T, int64_t d, void* stream) {
  check_sizes(B * T, T, d);
  with_types(st, yt, [&](auto* sp, auto* yp) {
    using S = elem<decltype(sp)>;
    using Y = elem<decltype(yp)>;
    constexpr int threads = 128;
    modln_bwd_sums_kernel<S, Y><<<column_grid(B, T, d, threads), threads, 0,
                                  static_cast<cudaStream_t>(stream)>>>(
        static_cast<const Y*>(dy), static_cast<const S*>(xs), lds, mean, rstd, s0, s1, T,
        static_cast<int>(d), rows_per_chunk(T));
  });
  check_launch("modulated LayerNorm backward (sums)");
}

void gated_residual_forward(const void* x, DType xt, const void* gate, DType gt, const void* h,
                            DType ht, void* out, int64_t B, int64_t T, int64_t d, void* stream) {
  check_sizes(B * T, T, d);
  const int64_t n = B * T * d;
  with_types(xt, gt, ht, [&](auto* xp, auto* gp, auto* hp) {
    using X = elem<decltype(xp)>;
    using G = elem<decltype(gp)>;
    using H = elem<decltype(hp)>;
    constexpr int threads = 256;
    const int64_t want = (n + threads - 1) / threads;
    const unsigned blocks = static_cast<unsigned>(want < 65536 * 8 ? want : 65536 * 8);
    gated_fwd_kernel<X, G, H><<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const X*>(x), static_cast<const G*>(gate), static_cast<const H*>(h),
        static_cast<X*>(out), n, T, static_cast<int>(d));
  });
  check_launch("gated residual forward");
}

void gated_residual_backward(const void* dout, DType ot, const void* gate, DType gt, const void* h,
                             DType ht, void* dh, float* dgate, int64_t B, int64_t T, int64_t d,
                             void* stream) {
  check_sizes(B * T, T, d);
  with_types(ot, gt, ht, [&](auto* op, auto* gp, auto* hp) {
    using O = elem<decltype(op)>;
    using G = elem<decltype(gp)>;
    using H = elem<decltype(hp)>;
    constexpr int threads = 128;
    gated_bwd_kernel<O, G, H><<<column_grid(B, T, d, threads), threads, 0,
                                static_cast<cudaStream_t>(stream)>>>(
        static_cast<const O*>(dout), static_cast<const G*>(gate), static_cast<const H*>(h),
        static_cast<H*>(dh), dgate, T, static_cast<int>(d), rows_per_chunk(T));
  });
  check_launch("gated residual backward");
}

}  // namespace microdit::kernels
