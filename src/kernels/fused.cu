// Fused CUDA kernels (kernels/fused.h). All arithmetic is float32; loads and stores convert.
#include "kernels/fused.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
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
                                    X* __restrict__ dx, int64_t ldx, const X* __restrict__ dres, int64_t T,
                                    int d) {
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
  X* dxr = dx + r * ldx;
  const X* resr = dres ? dres + r * d : nullptr;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float xhat = (to_f(xr[j]) - mu) * rs;
    const float v = rs * (g_at(j) - c1 - xhat * c2);
    // __fadd_rn: never contracted into a fused multiply-add with the product in v.
    dxr[j] = from_f<X>(resr ? __fadd_rn(round_to<X>(v), to_f(resr[j])) : v);
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

// moe_scatter_sum: one block per token row r = b * T + t; the row's slots and weights in
// shared memory, then each thread sums its columns over the experts in order.
template <typename S, typename D>
__global__ void moe_sum_kernel(const S* __restrict__ src, const float* __restrict__ w,
                               const int32_t* __restrict__ inv, D* __restrict__ dst, int64_t B, int64_t T,
                               int E, int64_t k, int d) {
  __shared__ int slot[64];
  __shared__ float weight[64];
  const int64_t r = blockIdx.x, b = r / T;
  if (threadIdx.x < E) {
    const int e = threadIdx.x;
    const int s = inv[r * E + e];
    slot[e] = s;
    weight[e] = (s >= 0 && w != nullptr) ? w[(b * E + e) * k + s] : 1.f;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float acc = 0.f;
    for (int e = 0; e < E; ++e) {
      const int s = slot[e];
      if (s < 0) continue;
      const float v = to_f(src[((e * B + b) * k + s) * int64_t(d) + j]);
      acc += round_to<D>(w != nullptr ? __fmul_rn(weight[e], v) : v);  // no FMA into the sum
    }
    dst[r * d + j] = from_f<D>(acc);
  }
}

// ---- Warp-per-row kernels (set_warp_row_kernels): one warp per row, 16-byte loads and stores,
// the row kept in registers between the passes, 32-bit indices. Each lane owns chunks
// c = lane + 32 i of V consecutive elements (V * the widest element type = 16 bytes), so a
// row of d elements takes d / V chunks, at most 32 * C.

std::atomic<bool> g_warp_rows{true};
std::atomic<int64_t> g_warp_launches{0};  // warp_row_launches()

// Alignment at most 16: wider vectors load as several 16-byte parts.
template <typename T, int V> struct alignas(sizeof(T) * V > 16 ? 16 : sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T> __device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename X, typename S, typename Y, int V, int C>
__global__ void modln_fwd_warp_kernel(const X* __restrict__ x, int ldx, S* __restrict__ xs,
                                      const float* __restrict__ w, const Y* __restrict__ shift,
                                      const Y* __restrict__ scale, Y* __restrict__ y,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                      int rows, int T, int d, float eps) {
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;  // a whole warp leaves together
  const int lane = threadIdx.x & 31, chunks = d / V, b = r / T;
  const X* xr = x + static_cast<size_t>(r) * ldx;
  float v[C][V];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int c = lane + 32 * i;
    if (c < chunks) {
      const auto xv = load_vec<V>(xr + c * V);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[i][k] = round_to<S>(to_f(xv.v[k]));
        s += v[i][k];
      }
    }
  }
  const float mean = warp_sum(s) / d;
  float q = 0.f;
#pragma unroll
  for (int i = 0; i < C; ++i)
    if (lane + 32 * i < chunks)
#pragma unroll
      for (int k = 0; k < V; ++k) q += (v[i][k] - mean) * (v[i][k] - mean);
  const float rstd = rsqrtf(warp_sum(q) / d + eps);
  const size_t row = static_cast<size_t>(r) * d, mod = static_cast<size_t>(b) * d;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int c = lane + 32 * i;
    if (c >= chunks) continue;
    const int j = c * V;
    Vec<Y, V> out;
    Vec<float, V> wv;
    Vec<Y, V> shv, scv;
    if (w) wv = load_vec<V>(w + j);
    if (scale) {
      shv = load_vec<V>(shift + mod + j);
      scv = load_vec<V>(scale + mod + j);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float o = (v[i][k] - mean) * rstd;
      if (w) o *= wv.v[k];
      if (scale) o = o * (1.f + to_f(scv.v[k])) + to_f(shv.v[k]);
      out.v[k] = from_f<Y>(o);
    }
    *reinterpret_cast<Vec<Y, V>*>(y + row + j) = out;
    if (xs) {
      Vec<S, V> sv;
#pragma unroll
      for (int k = 0; k < V; ++k) sv.v[k] = from_f<S>(v[i][k]);
      *reinterpret_cast<Vec<S, V>*>(xs + row + j) = sv;
    }
  }
  if (lane == 0) {
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

template <typename X, typename S, typename Y, int V, int C>
__global__ void modln_bwd_dx_warp_kernel(const Y* __restrict__ dy, const S* __restrict__ xs, int lds,
                                         const float* __restrict__ w, const Y* __restrict__ scale,
                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                         X* __restrict__ dx, int ldx, const X* __restrict__ dres, int rows,
                                         int T, int d) {
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31, chunks = d / V, b = r / T;
  const size_t row = static_cast<size_t>(r) * d, mod = static_cast<size_t>(b) * d;
  const S* xr = xs + static_cast<size_t>(r) * lds;
  const float mu = mean[r], rs = rstd[r];
  float g[C][V], xhat[C][V];
  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int c = lane + 32 * i;
    if (c >= chunks) continue;
    const int j = c * V;
    const auto dyv = load_vec<V>(dy + row + j);
    const auto xv = load_vec<V>(xr + j);
    Vec<float, V> wv;
    Vec<Y, V> scv;
    if (w) wv = load_vec<V>(w + j);
    if (scale) scv = load_vec<V>(scale + mod + j);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float gk = to_f(dyv.v[k]);
      if (scale) gk *= 1.f + to_f(scv.v[k]);
      if (w) gk *= wv.v[k];
      g[i][k] = gk;
      xhat[i][k] = (to_f(xv.v[k]) - mu) * rs;
      s1 += gk;
      s2 += gk * xhat[i][k];
    }
  }
  const float c1 = warp_sum(s1) / d, c2 = warp_sum(s2) / d;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int c = lane + 32 * i;
    if (c >= chunks) continue;
    Vec<X, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = from_f<X>(rs * (g[i][k] - c1 - xhat[i][k] * c2));
    if (dres) {
      const auto rv = load_vec<V>(dres + row + c * V);
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = from_f<X>(__fadd_rn(to_f(out.v[k]), to_f(rv.v[k])));
    }
    *reinterpret_cast<Vec<X, V>*>(dx + static_cast<size_t>(r) * ldx + c * V) = out;
  }
}

// V consecutive elements per thread (d % V == 0, so they share a row); n < 2^31.
template <typename X, typename G, typename H, int V>
__global__ void gated_fwd_vec_kernel(const X* __restrict__ x, const G* __restrict__ gate,
                                     const H* __restrict__ h, X* __restrict__ out, int n, int T, int d) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * V;  // 64-bit: i + stride may pass 2^31
  for (int64_t i64 = int64_t(blockIdx.x * blockDim.x + threadIdx.x) * V; i64 < n; i64 += stride) {
    const int i = static_cast<int>(i64), row = i / d, j = i - row * d, b = row / T;
    const auto xv = load_vec<V>(x + i);
    const auto hv = load_vec<V>(h + i);
    const auto gv = load_vec<V>(gate + b * d + j);
    Vec<X, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_f<X>(to_f(xv.v[k]) + to_f(gv.v[k]) * to_f(hv.v[k]));
    *reinterpret_cast<Vec<X, V>*>(out + i) = o;
  }
}

// The two column kernels above with V = 4 consecutive columns per thread (8- or 16-byte loads
// instead of 2- or 4-byte ones), for d % 4 == 0 and aligned rows; the same sums in the same order
// per column.
template <typename S, typename Y, int V>
__global__ void modln_bwd_sums_vec_kernel(const Y* __restrict__ dy, const S* __restrict__ xs, int64_t lds,
                                          const float* __restrict__ mean, const float* __restrict__ rstd,
                                          float* __restrict__ s0, float* __restrict__ s1, int64_t T, int d,
                                          int64_t chunk) {
  const int j = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (j >= d) return;
  const int64_t b = blockIdx.y;
  const int64_t t0 = int64_t(blockIdx.z) * chunk;
  const int64_t t1 = t0 + chunk < T ? t0 + chunk : T;
  float a0[V], a1[V];
#pragma unroll
  for (int k = 0; k < V; ++k) a0[k] = a1[k] = 0.f;
#pragma unroll 4
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r = b * T + t;
    const auto gv = load_vec<V>(dy + r * d + j);
    const auto xv = load_vec<V>(xs + r * lds + j);
    const float mu = mean[r], rs = rstd[r];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float g = to_f(gv.v[k]);
      a0[k] += g;
      a1[k] += g * (to_f(xv.v[k]) - mu) * rs;
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    atomicAdd(s0 + b * d + j + k, a0[k]);
    atomicAdd(s1 + b * d + j + k, a1[k]);
  }
}

template <typename O, typename G, typename H, int V>
__global__ void gated_bwd_vec_kernel(const O* __restrict__ dout, const G* __restrict__ gate,
                                     const H* __restrict__ h, H* __restrict__ dh, float* __restrict__ dgate,
                                     int64_t T, int d, int64_t chunk) {
  const int j = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (j >= d) return;
  const int64_t b = blockIdx.y;
  const int64_t t0 = int64_t(blockIdx.z) * chunk;
  const int64_t t1 = t0 + chunk < T ? t0 + chunk : T;
  const auto gatev = load_vec<V>(gate + b * d + j);
  float acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = 0.f;
#pragma unroll 4
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i = (b * T + t) * d + j;
    const auto dv = load_vec<V>(dout + i);
    const auto hv = load_vec<V>(h + i);
    Vec<H, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float g = to_f(dv.v[k]);
      o.v[k] = from_f<H>(g * to_f(gatev.v[k]));
      acc[k] += g * to_f(hv.v[k]);
    }
    *reinterpret_cast<Vec<H, V>*>(dh + i) = o;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) atomicAdd(dgate + b * d + j + k, acc[k]);
}

// SwiGLU's elementwise part (kernels/fused.h), V consecutive elements per thread: V = 16 bytes
// when the pointers are 16-byte aligned and n % V == 0, else V = 1.
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T, int V>
__global__ void swiglu_fwd_kernel(const T* __restrict__ u, const T* __restrict__ v, T* __restrict__ p,
                                  int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n; i += stride) {
    const auto uv = load_vec<V>(u + i);
    const auto vv = load_vec<V>(v + i);
    Vec<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float x = to_f(uv.v[k]);
      o.v[k] = from_f<T>(x * sigmoid_f(x) * to_f(vv.v[k]));
    }
    *reinterpret_cast<Vec<T, V>*>(p + i) = o;
  }
}

template <typename T, int V>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dp, const T* __restrict__ u, const T* __restrict__ v,
                                  T* __restrict__ du, T* __restrict__ dv, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n; i += stride) {
    const auto gv = load_vec<V>(dp + i);
    const auto uv = load_vec<V>(u + i);
    const auto vv = load_vec<V>(v + i);
    Vec<T, V> a, b;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float x = to_f(uv.v[k]), g = to_f(gv.v[k]), s = sigmoid_f(x);
      a.v[k] = from_f<T>(g * to_f(vv.v[k]) * (s * (1.f + x * (1.f - s))));
      b.v[k] = from_f<T>(g * x * s);
    }
    *reinterpret_cast<Vec<T, V>*>(du + i) = a;
    *reinterpret_cast<Vec<T, V>*>(dv + i) = b;
  }
}

// Elements per 16 bytes of the widest of the types.
template <typename... T> constexpr int vec_width() {
  constexpr size_t widest = std::max({sizeof(T)...});
  return static_cast<int>(16 / widest);
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launches a warp-per-row kernel with C = 1, 2, 4 or 8 chunks per lane, the least that
// holds d / V chunks; false (nothing launched) when d / V needs more.
template <int V, typename Launch> bool launch_rows(int64_t d, Launch&& launch) {
  const int64_t per_lane = (d / V + 31) / 32;
  if (per_lane <= 1) return launch(std::integral_constant<int, 1>{});
  if (per_lane <= 2) return launch(std::integral_constant<int, 2>{});
  if (per_lane <= 4) return launch(std::integral_constant<int, 4>{});
  if (per_lane <= 8) return launch(std::integral_constant<int, 8>{});
  return false;
}

constexpr int kWarpRowThreads = 256;  // 8 rows per block

unsigned warp_row_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpRowThreads / 32 - 1) / (kWarpRowThreads / 32));
}

bool warp_rows_fit(int64_t rows, int64_t d, int64_t ld) {
  return g_warp_rows.load() && rows * std::max(d, ld) < (int64_t(1) << 31);
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
    constexpr int V = vec_width<X, S, Y>();
    if (warp_rows_fit(rows, d, ldx) && d % V == 0 && ldx % V == 0 && aligned16(x) && aligned16(xs) &&
        aligned16(w) && aligned16(shift) && aligned16(scale) && aligned16(y) &&
        launch_rows<V>(d, [&](auto c) {
          modln_fwd_warp_kernel<X, S, Y, V, decltype(c)::value>
              <<<warp_row_blocks(rows), kWarpRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
                  static_cast<const X*>(x), static_cast<int>(ldx), static_cast<S*>(xs), w,
                  static_cast<const Y*>(shift), static_cast<const Y*>(scale), static_cast<Y*>(y), mean, rstd,
                  static_cast<int>(rows), static_cast<int>(T), static_cast<int>(d), eps);
          g_warp_launches.fetch_add(1, std::memory_order_relaxed);
          return true;
        }))
      return;
    modln_fwd_kernel<X, S, Y><<<static_cast<unsigned>(rows), row_threads(d), 0,
                                static_cast<cudaStream_t>(stream)>>>(
        static_cast<const X*>(x), ldx, static_cast<S*>(xs), w, static_cast<const Y*>(shift),
        static_cast<const Y*>(scale), static_cast<Y*>(y), mean, rstd, T, static_cast<int>(d), eps);
  });
  check_launch("modulated LayerNorm forward");
}

void modln_backward_dx(const void* dy, DType yt, const void* xs, int64_t lds, DType st,
                       const float* w, const void* scale, const float* mean, const float* rstd,
                       void* dx, int64_t ldx, DType xt, const void* dres, int64_t rows, int64_t T, int64_t d,
                       void* stream) {
  check_sizes(rows, T, d);
  if (ldx < d) throw std::runtime_error("fused kernels: dx row stride below d");
  with_types(xt, st, yt, [&](auto* xp, auto* sp, auto* yp) {
    using X = elem<decltype(xp)>;
    using S = elem<decltype(sp)>;
    using Y = elem<decltype(yp)>;
    constexpr int V = vec_width<X, S, Y>();
    if (warp_rows_fit(rows, d, std::max(lds, ldx)) && d % V == 0 && lds % V == 0 && ldx % V == 0 &&
        aligned16(dy) && aligned16(xs) && aligned16(w) && aligned16(scale) && aligned16(dx) && aligned16(dres) &&
        launch_rows<V>(d, [&](auto c) {
          modln_bwd_dx_warp_kernel<X, S, Y, V, decltype(c)::value>
              <<<warp_row_blocks(rows), kWarpRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
                  static_cast<const Y*>(dy), static_cast<const S*>(xs), static_cast<int>(lds), w,
                  static_cast<const Y*>(scale), mean, rstd, static_cast<X*>(dx), static_cast<int>(ldx),
                  static_cast<const X*>(dres), static_cast<int>(rows), static_cast<int>(T), static_cast<int>(d));
          g_warp_launches.fetch_add(1, std::memory_order_relaxed);
          return true;
        }))
      return;
    modln_bwd_dx_kernel<X, S, Y><<<static_cast<unsigned>(rows), row_threads(d), 0,
                                   static_cast<cudaStream_t>(stream)>>>(
        static_cast<const Y*>(dy), static_cast<const S*>(xs), lds, w,
        static_cast<const Y*>(scale), mean, rstd, static_cast<X*>(dx), ldx, static_cast<const X*>(dres), T,
        static_cast<int>(d));
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
    constexpr int V = 4;
    auto aligned = [](const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    if (g_warp_rows.load() && d % V == 0 && lds % V == 0 && aligned(dy, V * sizeof(Y)) &&
        aligned(xs, V * sizeof(S))) {
      modln_bwd_sums_vec_kernel<S, Y, V><<<column_grid(B, T, d / V, threads), threads, 0,
                                           static_cast<cudaStream_t>(stream)>>>(
          static_cast<const Y*>(dy), static_cast<const S*>(xs), lds, mean, rstd, s0, s1, T,
          static_cast<int>(d), rows_per_chunk(T));
      g_warp_launches.fetch_add(1, std::memory_order_relaxed);
      return;
    }
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
    constexpr int V = vec_width<X, G, H>();
    if (g_warp_rows.load() && n < (int64_t(1) << 31) && d % V == 0 && aligned16(x) && aligned16(gate) &&
        aligned16(h) && aligned16(out)) {
      const int64_t want = (n / V + threads - 1) / threads;
      const unsigned blocks = static_cast<unsigned>(want < 65536 * 8 ? want : 65536 * 8);
      gated_fwd_vec_kernel<X, G, H, V><<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const X*>(x), static_cast<const G*>(gate), static_cast<const H*>(h), static_cast<X*>(out),
          static_cast<int>(n), static_cast<int>(T), static_cast<int>(d));
      g_warp_launches.fetch_add(1, std::memory_order_relaxed);
      return;
    }
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
    constexpr int V = 4;
    auto aligned = [](const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    if (g_warp_rows.load() && d % V == 0 && aligned(dout, V * sizeof(O)) && aligned(gate, V * sizeof(G)) &&
        aligned(h, V * sizeof(H)) && aligned(dh, V * sizeof(H))) {
      gated_bwd_vec_kernel<O, G, H, V><<<column_grid(B, T, d / V, threads), threads, 0,
                                         static_cast<cudaStream_t>(stream)>>>(
          static_cast<const O*>(dout), static_cast<const G*>(gate), static_cast<const H*>(h),
          static_cast<H*>(dh), dgate, T, static_cast<int>(d), rows_per_chunk(T));
      g_warp_launches.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    gated_bwd_kernel<O, G, H><<<column_grid(B, T, d, threads), threads, 0,
                                static_cast<cudaStream_t>(stream)>>>(
        static_cast<const O*>(dout), static_cast<const G*>(gate), static_cast<const H*>(h),
        static_cast<H*>(dh), dgate, T, static_cast<int>(d), rows_per_chunk(T));
  });
  check_launch("gated residual backward");
}

// Launches kernel<T, V> over n elements with V = 16 / sizeof(T) where `vec` allows, else V = 1.
template <typename T, typename Launch> void launch_elementwise(int64_t n, bool vec, Launch&& launch) {
  constexpr int threads = 256;
  constexpr int V = 16 / sizeof(T);
  const bool wide = vec && n % V == 0;
  const int64_t want = ((wide ? n / V : n) + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want, 65536 * 8)));
  if (wide) launch(std::integral_constant<int, V>{}, blocks, threads);
  else launch(std::integral_constant<int, 1>{}, blocks, threads);
}

void swiglu_forward(const void* u, const void* v, void* p, DType t, int64_t n, void* stream) {
  if (n < 0) throw std::runtime_error("fused kernels: bad size " + std::to_string(n));
  if (n == 0) return;
  with_type(t, [&](auto* tp) {
    using T = elem<decltype(tp)>;
    launch_elementwise<T>(n, aligned16(u) && aligned16(v) && aligned16(p), [&](auto V, unsigned blocks, int threads) {
      swiglu_fwd_kernel<T, decltype(V)::value><<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(u), static_cast<const T*>(v), static_cast<T*>(p), n);
    });
  });
  check_launch("SwiGLU forward");
}

void swiglu_backward(const void* dp, const void* u, const void* v, void* du, void* dv, DType t,
                     int64_t n, void* stream) {
  if (n < 0) throw std::runtime_error("fused kernels: bad size " + std::to_string(n));
  if (n == 0) return;
  with_type(t, [&](auto* tp) {
    using T = elem<decltype(tp)>;
    const bool vec = aligned16(dp) && aligned16(u) && aligned16(v) && aligned16(du) && aligned16(dv);
    launch_elementwise<T>(n, vec, [&](auto V, unsigned blocks, int threads) {
      swiglu_bwd_kernel<T, decltype(V)::value><<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(dp), static_cast<const T*>(u), static_cast<const T*>(v), static_cast<T*>(du),
          static_cast<T*>(dv), n);
    });
  });
  check_launch("SwiGLU backward");
}

void moe_scatter_sum(const void* src, DType st, const float* w, const int32_t* inv, void* dst, DType dt,
                     int64_t B, int64_t T, int64_t E, int64_t k, int64_t d, void* stream) {
  if (B <= 0 || T <= 0 || E <= 0 || E > 64 || k <= 0 || d <= 0 || d > (int64_t(1) << 30) ||
      B * T > (int64_t(1) << 31) - 1)
    throw std::runtime_error("fused kernels: bad expert sum sizes (B " + std::to_string(B) + ", T " +
                             std::to_string(T) + ", E " + std::to_string(E) + ", k " + std::to_string(k) +
                             ", d " + std::to_string(d) + ")");
  with_types(st, dt, [&](auto* sp, auto* dp) {
    using S = elem<decltype(sp)>;
    using D = elem<decltype(dp)>;
    const int threads = d <= 256 ? 64 : 128;  // >= E
    moe_sum_kernel<S, D><<<static_cast<unsigned>(B * T), threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const S*>(src), w, inv, static_cast<D*>(dst), B, T, static_cast<int>(E), k,
        static_cast<int>(d));
  });
  check_launch("expert-choice sum");
}

void set_warp_row_kernels(bool on) { g_warp_rows = on; }
bool warp_row_kernels() { return g_warp_rows; }
int64_t warp_row_launches() { return g_warp_launches.load(); }

}  // namespace microdit::kernels
