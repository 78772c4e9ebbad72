#include "core/device.h"

#include <ATen/Parallel.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <sys/resource.h>
#include <torch/cuda.h>
#include <torch/version.h>

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
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

void reset_peak_memory(const c10::Device& device) {
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
}

std::string peak_memory_text(const c10::Device& device) {
  return fmt::format("{:.3g} GiB ({})", peak_memory_bytes(device) / double(1LL << 30),
                     device.is_cuda() ? "CUDA allocated" : "process peak RSS");
}

std::string runtime_summary(const c10::Device& device) {
  return fmt::format("LibTorch {}, device {}, {} intra-op threads", TORCH_VERSION, device.str(),
                     at::get_num_threads());
}

}  // namespace microdit
