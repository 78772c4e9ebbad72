#include "core/cpu_allocations.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <malloc.h>

#include <atomic>
#include <mutex>

namespace microdit {

namespace {

std::atomic<int64_t> g_now{0}, g_peak{0};
std::atomic<bool> g_tracked{false};

// A block counts as malloc's usable size (the request rounded up to malloc's size class), so
// that the deleter needs only the pointer; CUDA's caching allocator rounds its blocks too.
int64_t block_bytes(void* p) { return static_cast<int64_t>(malloc_usable_size(p)); }

void count(int64_t delta) {
  const int64_t now = g_now.fetch_add(delta, std::memory_order_relaxed) + delta;
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void free_counted(void* data) {
  if (!data) return;
  count(-block_bytes(data));
  c10::free_cpu(data);
}

struct CountingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &free_counted, c10::Device(c10::kCPU)};
    void* data = c10::alloc_cpu(n);
    count(block_bytes(data));
    return {data, data, &free_counted, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_counted; }
  void copy_data(void* dest, const void* src, std::size_t n) const override { default_copy_data(dest, src, n); }
};

}  // namespace

void track_cpu_allocations() {
  static std::once_flag once;
  std::call_once(once, [] {
    static CountingCPUAllocator allocator;
    // Above the default CPU allocator's priority (0), so every new CPU tensor comes from here.
    c10::SetCPUAllocator(&allocator, /*priority=*/10);
    g_tracked = true;
  });
}

bool cpu_allocations_tracked() { return g_tracked; }
int64_t cpu_allocated_bytes() { return g_now.load(); }
int64_t cpu_peak_allocated_bytes() { return g_peak.load(); }
void reset_cpu_allocation_peak() { g_peak.store(g_now.load()); }

}  // namespace microdit
