// Pieces the float32 and bf16 CPU products share (kernels/gemm_cpu.cpp, gemm_cpu_bf16.cpp).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace microdit::kernels::cpu::gemm_detail {

// A buffer of T at 64-byte alignment that grows as needed (one per thread where it is used).
template <class T>
struct AlignedBuffer {
  std::unique_ptr<T, decltype(&std::free)> data{nullptr, &std::free};
  int64_t size = 0;
  T* get(int64_t n) {
    if (n > size) {
      const auto bytes = static_cast<size_t>((n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64);
      data.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      if (!data) throw std::bad_alloc();
      size = n;
    }
    return data.get();
  }
};

// The lowest n of 16 lanes (none for n <= 0, all for n >= 16).
inline __mmask16 low_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// 16 x 16 32-bit words transposed in registers: r[i] lane j <- r[j] lane i.
__attribute__((target("avx512f"))) inline __attribute__((always_inline)) void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved by 32 bits
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // then by 64 bits: each 128-bit lane holds a 4 x 4 block
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // then the 128-bit lanes
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

}  // namespace microdit::kernels::cpu::gemm_detail
