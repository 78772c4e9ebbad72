#include "core/kernel_profile.h"

#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <vector>

#include "core/error.h"

namespace microdit {

std::string profile_device_kernels(c10::Device device, const std::function<void()>& work, int top) {
  MD_CHECK(device.is_cuda(), "--profile lists GPU kernels: it needs --device cuda");
  namespace prof = torch::profiler::impl;
  const prof::ProfilerConfig config(prof::ProfilerState::KINETO);
  const std::set<prof::ActivityType> activities{prof::ActivityType::CPU, prof::ActivityType::CUDA};
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
  const auto t0 = std::chrono::steady_clock::now();
  work();
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const auto result = torch::autograd::profiler::disableProfiler();

  struct Sum {
    double ns = 0;
    int64_t count = 0;
  };
  std::map<std::string, Sum> by_name;
  double total_ns = 0;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;  // kernels, copies and memsets on the GPU
    auto& s = by_name[e.name()];
    s.ns += static_cast<double>(e.durationNs());
    s.count += 1;
    total_ns += static_cast<double>(e.durationNs());
  }
  std::vector<std::pair<std::string, Sum>> rows(by_name.begin(), by_name.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  std::string out = fmt::format("{:>9} {:>6} {:>7} {:>9}  {}\n", "ms", "share", "count", "mean us", "device activity");
  for (size_t i = 0; i < rows.size() && static_cast<int>(i) < top; ++i) {
    const auto& [name, s] = rows[i];
    out += fmt::format("{:9.2f} {:5.1f}% {:7} {:9.1f}  {}\n", s.ns / 1e6, 100 * s.ns / std::max(total_ns, 1.0),
                       s.count, s.ns / 1e3 / static_cast<double>(s.count), name.substr(0, 140));
  }
  int64_t launches = 0;
  for (const auto& [name, s] : rows) launches += s.count;
  out += fmt::format("device busy {:.1f} ms of {:.1f} ms wall ({:.0f}%), {} device activities, {} distinct\n",
                     total_ns / 1e6, wall_ms, 100 * total_ns / 1e6 / std::max(wall_ms, 1e-9), launches,
                     rows.size());
  return out;
}

}  // namespace microdit
