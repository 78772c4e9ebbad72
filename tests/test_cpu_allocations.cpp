// The counting CPU allocator (core/cpu_allocations.h): bench's CPU memory figures.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/cpu_allocations.h"
#include "core/device.h"

using namespace microdit;

TEST(CpuAllocations, CountsLiveTensorBytesAndThePeak) {
  track_cpu_allocations();
  track_cpu_allocations();  // once only
  ASSERT_TRUE(cpu_allocations_tracked());
  const c10::Device cpu(c10::kCPU);
  const int64_t before = cpu_allocated_bytes();
  reset_peak_memory(cpu);
  EXPECT_EQ(cpu_peak_allocated_bytes(), before);
  constexpr int64_t n = 3 << 20;  // floats: 12 MiB
  {
    auto a = torch::empty({n});
    const int64_t with_a = cpu_allocated_bytes() - before;
    EXPECT_GE(with_a, 4 * n);
    EXPECT_LT(with_a, 4 * n + (64 << 10));  // malloc's rounding of one block
    EXPECT_EQ(allocated_bytes(cpu) - before, with_a);
    {
      auto b = torch::empty({n}, torch::kBFloat16);  // 6 MiB more
      EXPECT_GE(cpu_allocated_bytes() - before, 6 * n);
    }
    EXPECT_EQ(cpu_allocated_bytes() - before, with_a);  // b freed
  }
  EXPECT_EQ(cpu_allocated_bytes(), before);
  // The peak held both tensors, and peak_memory_bytes reports it.
  EXPECT_GE(cpu_peak_allocated_bytes() - before, 6 * n);
  EXPECT_EQ(peak_memory_bytes(cpu), cpu_peak_allocated_bytes());
  EXPECT_NE(peak_memory_text(cpu).find("CPU tensors allocated"), std::string::npos);
  reset_peak_memory(cpu);
  EXPECT_EQ(cpu_peak_allocated_bytes(), before);
}

TEST(CpuAllocations, TensorsFromBeforeTrackingStayUsable) {
  // A tensor made before tracking keeps the default allocator's deleter: it stays usable, and
  // freeing it changes no count.
  auto old = torch::zeros({1 << 20});
  track_cpu_allocations();
  const int64_t now = cpu_allocated_bytes();
  auto fresh = torch::ones({1 << 20});
  EXPECT_GE(cpu_allocated_bytes() - now, 4 << 20);
  fresh = torch::Tensor();
  EXPECT_EQ(cpu_allocated_bytes(), now);
  EXPECT_EQ((old + 1).sum().item<float>(), float(1 << 20));
}
