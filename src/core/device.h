// Device and thread selection shared by every command (--device cpu|cuda|auto, --threads N).
#pragma once
#include <c10/core/Device.h>

#include <string>

namespace microdit {

// "auto" (CUDA when LibTorch sees a GPU, else CPU), "cpu", "cuda" or "cuda:N".
c10::Device resolve_device(const std::string& name);
// N > 0 sets LibTorch's intra-op threads; 0 keeps LibTorch's default (all cores).
void set_threads(int n);
// Peak memory since the process started (or reset_peak_memory): on CUDA the caching
// allocator's peak of allocated bytes on that device; on the CPU the peak bytes of live
// tensors where track_cpu_allocations (core/cpu_allocations.h) is on, else the process's peak
// resident set size (which cannot be reset). peak_memory_text: "64.3 GiB (CUDA allocated)",
// "1.02 GiB (CPU tensors allocated; process peak RSS 1.46 GiB)".
int64_t peak_memory_bytes(const c10::Device& device);
int64_t peak_rss_bytes();
// Bytes of live tensors now: CUDA's allocated bytes, or on the CPU the tracked bytes (0 when
// track_cpu_allocations is off).
int64_t allocated_bytes(const c10::Device& device);
void reset_peak_memory(const c10::Device& device);
std::string peak_memory_text(const c10::Device& device);
// One line describing the runtime: LibTorch version, device, threads.
std::string runtime_summary(const c10::Device& device);

}  // namespace microdit
