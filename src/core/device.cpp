#include "core/device.h"

#include <ATen/Parallel.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <sys/resource.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include "core/cpu_allocations.h"
#include "core/error.h"

namespace microdit {

c10::Device resolve_device(const std::string& name) {
  if (name == "auto" || name.empty())
    return torch::cuda::is_available() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  if (name == "cpu") return c10::Device(c10::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    MD_CHECK(torch::cuda::is_available(),
             "--device {}: LibTorch sees no CUDA GPU on this machine (use --device cpu)", name);
    c10::DeviceIndex index = 0;
    if (name.size() > 4) {
      MD_CHECK(name[4] == ':' && name.size() > 5, "--device {}: expected cuda or cuda:N", name);
      try {
        index = static_cast<c10::DeviceIndex>(std::stoi(name.substr(5)));
      } catch (const std::exception&) {
        fail("--device {}: expected cuda or cuda:N", name);
      }
      MD_CHECK(index >= 0 && index < static_cast<int>(torch::cuda::device_count()),
               "--device {}: only {} CUDA device(s) visible", name, torch::cuda::device_count());
    }
    return c10::Device(c10::kCUDA, index);
  }
  fail("--device {}: expected cpu, cuda, cuda:N or auto", name);
}

void set_threads(int n) {
  MD_CHECK(n >= 0, "--threads {}: must be 0 (LibTorch default) or a positive count", n);
  if (n > 0) at::set_num_threads(n);
}

int64_t peak_memory_bytes(const c10::Device& device) {
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  }
  return cpu_allocations_tracked() ? cpu_peak_allocated_bytes() : peak_rss_bytes();
}

int64_t allocated_bytes(const c10::Device& device) {
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
  }
  return cpu_allocated_bytes();
}

int64_t peak_rss_bytes() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

void reset_peak_memory(const c10::Device& device) {
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
  else reset_cpu_allocation_peak();
}

std::string peak_memory_text(const c10::Device& device) {
  constexpr double GiB = 1LL << 30;
  if (device.is_cuda()) return fmt::format("{:.3g} GiB (CUDA allocated)", peak_memory_bytes(device) / GiB);
  if (cpu_allocations_tracked())
    return fmt::format("{:.3g} GiB (CPU tensors allocated; process peak RSS {:.3g} GiB)",
                       cpu_peak_allocated_bytes() / GiB, peak_rss_bytes() / GiB);
  return fmt::format("{:.3g} GiB (process peak RSS)", peak_rss_bytes() / GiB);
}

std::string runtime_summary(const c10::Device& device) {
  return fmt::format("LibTorch {}, device {}, {} intra-op threads", TORCH_VERSION, device.str(),
                     at::get_num_threads());
}

}  // namespace microdit
