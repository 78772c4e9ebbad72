#include "core/kernel_profile.h"

#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <set>
#include <vector>

#include "core/error.h"

namespace microdit {

namespace {

struct Sum {
  double ns = 0;
  int64_t count = 0;
};

// The `top` rows of by_name, most time first: total ms, share of total_ns, count, mean us.
std::string table(const std::map<std::string, Sum>& by_name, double total_ns, int top, const char* what) {
  std::vector<std::pair<std::string, Sum>> rows(by_name.begin(), by_name.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  std::string out = fmt::format("{:>9} {:>6} {:>7} {:>9}  {}\n", "ms", "share", "count", "mean us", what);
  for (size_t i = 0; i < rows.size() && static_cast<int>(i) < top; ++i) {
    const auto& [name, s] = rows[i];
    out += fmt::format("{:9.2f} {:5.1f}% {:7} {:9.1f}  {}\n", s.ns / 1e6, 100 * s.ns / std::max(total_ns, 1.0),
                       s.count, s.ns / 1e3 / static_cast<double>(s.count), name.substr(0, 140));
  }
  return out;
}

// CPU operators by self time: an operator's time less that of the operators it called, on
// each thread (CPU workers included: they inherit the profiler with the caller's state).
std::string cpu_ops(const std::vector<torch::autograd::profiler::KinetoEvent>& events, double wall_ms, int top) {
  struct Ev {
    uint64_t t0, t1, thread;
    std::string name;
  };
  std::vector<Ev> evs;
  for (const auto& e : events)
    if (e.deviceType() == c10::DeviceType::CPU && !e.isAsync() && e.endNs() > e.startNs())
      evs.push_back({e.startNs(), e.endNs(), e.startThreadId(), e.name()});
  // Per thread by start, outer before inner; a stack of open operators gives each one's parent.
  std::sort(evs.begin(), evs.end(), [](const Ev& a, const Ev& b) {
    return a.thread != b.thread ? a.thread < b.thread : a.t0 != b.t0 ? a.t0 < b.t0 : a.t1 > b.t1;
  });
  std::vector<double> self(evs.size());
  std::vector<size_t> open;
  for (size_t i = 0; i < evs.size(); ++i) {
    while (!open.empty() && (evs[open.back()].thread != evs[i].thread || evs[open.back()].t1 <= evs[i].t0))
      open.pop_back();
    self[i] = static_cast<double>(evs[i].t1 - evs[i].t0);
    if (!open.empty()) self[open.back()] -= static_cast<double>(std::min(evs[i].t1, evs[open.back()].t1) - evs[i].t0);
    open.push_back(i);
  }
  std::map<std::string, Sum> by_name;
  std::set<uint64_t> threads;
  double total_ns = 0;
  for (size_t i = 0; i < evs.size(); ++i) {
    auto& s = by_name[evs[i].name];
    s.ns += std::max(self[i], 0.0);
    s.count += 1;
    total_ns += std::max(self[i], 0.0);
    threads.insert(evs[i].thread);
  }
  return table(by_name, total_ns, top, "CPU operator (self time)") +
         fmt::format("operators {:.1f} ms on {} threads in {:.1f} ms wall, {} calls, {} distinct\n", total_ns / 1e6,
                     threads.size(), wall_ms, evs.size(), by_name.size());
}

}  // namespace

std::string profile_ops(c10::Device device, const std::function<void()>& work, int top) {
  MD_CHECK(device.is_cuda() || device.is_cpu(), "--profile: CPU or CUDA devices only, got {}", device.str());
  // Kineto logs an error when it finds no GPU; that is no error for a CPU profile (a user's
  // own KINETO_LOG_LEVEL stays as it is).
  if (device.is_cpu()) setenv("KINETO_LOG_LEVEL", "5", /*overwrite=*/0);
  namespace prof = torch::profiler::impl;
  const prof::ProfilerConfig config(prof::ProfilerState::KINETO);
  std::set<prof::ActivityType> activities{prof::ActivityType::CPU};
  if (device.is_cuda()) activities.insert(prof::ActivityType::CUDA);
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
  const auto t0 = std::chrono::steady_clock::now();
  work();
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const auto result = torch::autograd::profiler::disableProfiler();
  if (device.is_cpu()) return cpu_ops(result->events(), wall_ms, top);

  std::map<std::string, Sum> by_name;
  double total_ns = 0;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;  // kernels, copies and memsets on the GPU
    auto& s = by_name[e.name()];
    s.ns += static_cast<double>(e.durationNs());
    s.count += 1;
    total_ns += static_cast<double>(e.durationNs());
  }
  std::string out = table(by_name, total_ns, top, "device activity");
  int64_t launches = 0;
  for (const auto& [name, s] : by_name) launches += s.count;
  out += fmt::format("device busy {:.1f} ms of {:.1f} ms wall ({:.0f}%), {} device activities, {} distinct\n",
                     total_ns / 1e6, wall_ms, 100 * total_ns / 1e6 / std::max(wall_ms, 1e-9), launches,
                     by_name.size());
  return out;
}

}  // namespace microdit
