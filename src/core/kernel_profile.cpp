#include "core/kernel_profile.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <map>
#include <set>
#include <vector>

#include "core/error.h"
#include "io/atomic_file.h"

namespace microdit {

namespace {

struct Sum {
  double ns = 0;
  int64_t count = 0;
};

// The rows of by_name, most time first.
std::vector<std::pair<std::string, Sum>> sorted_rows(const std::map<std::string, Sum>& by_name) {
  std::vector<std::pair<std::string, Sum>> rows(by_name.begin(), by_name.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  return rows;
}

// The `top` rows of by_name, most time first: total ms, share of total_ns, count, mean us.
std::string table(const std::map<std::string, Sum>& by_name, double total_ns, int top, const char* what) {
  const auto rows = sorted_rows(by_name);
  std::string out = fmt::format("{:>9} {:>6} {:>7} {:>9}  {}\n", "ms", "share", "count", "mean us", what);
  for (size_t i = 0; i < rows.size() && static_cast<int>(i) < top; ++i) {
    const auto& [name, s] = rows[i];
    out += fmt::format("{:9.2f} {:5.1f}% {:7} {:9.1f}  {}\n", s.ns / 1e6, 100 * s.ns / std::max(total_ns, 1.0),
                       s.count, s.ns / 1e3 / static_cast<double>(s.count), name.substr(0, 170));
  }
  return out;
}

// Every row of by_name, most time first, as [{"name", "count", "ms"}].
nlohmann::json rows_json(const std::map<std::string, Sum>& by_name) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [name, s] : sorted_rows(by_name)) out.push_back({{"name", name}, {"count", s.count}, {"ms", s.ns / 1e6}});
  return out;
}

// The profile as tools/compare_profiles.py reads it (tools/bench_reference.py writes the same).
// `threads`: the CPU threads with operators (on the CPU, busy time sums over them).
void write_profile_json(const std::string& path, c10::Device device, const char* unit, int runs, size_t threads,
                        double wall_ms, double busy_ns, const std::map<std::string, Sum>& by_name,
                        const std::map<std::string, Sum>& by_site) {
  const nlohmann::json j = {{"program", "microdit"},  {"device", device.is_cuda() ? "cuda" : "cpu"},
                            {"unit", unit},           {"runs", runs}, {"threads", threads},
                            {"wall_ms", wall_ms},     {"busy_ms", busy_ns / 1e6},
                            {"by_name", rows_json(by_name)}, {"by_site", rows_json(by_site)}};
  write_file_atomic(path, j.dump(1) + "\n");
}

// "bf16[256,64,1024], f32[1024]": the tensor inputs of a profiled operator.
std::string input_text(const torch::autograd::profiler::KinetoEvent& e) {
  if (!e.hasShapes() || !e.hasTypes()) return "";
  const auto shapes = e.shapes();
  const auto types = e.dtypes();
  static const std::map<std::string, std::string> short_name = {
      {"float", "f32"}, {"c10::BFloat16", "bf16"}, {"c10::Half", "f16"}, {"double", "f64"},
      {"long int", "i64"}, {"int", "i32"}, {"bool", "bool"}, {"unsigned char", "u8"}};
  std::string out;
  for (size_t i = 0; i < shapes.size() && i < types.size(); ++i) {
    const auto it = short_name.find(types[i]);
    if (it == short_name.end() || shapes[i].empty()) continue;  // scalars, lists, None
    out += fmt::format("{}{}[{}]", out.empty() ? "" : ", ", it->second, fmt::join(shapes[i], ","));
  }
  return out;
}

// Autograd wraps each node in "autograd::engine::evaluate_function: <node>", and names our
// custom functions' nodes "torch::autograd::CppNode<microdit::(anonymous namespace)::F>": "F".
std::string short_op_name(std::string name) {
  const std::string wrap = "autograd::engine::evaluate_function: ", node = "torch::autograd::CppNode<";
  if (name.rfind(wrap, 0) == 0) name.erase(0, wrap.size());
  if (name.rfind(node, 0) == 0 && name.back() == '>') {
    name = name.substr(node.size(), name.size() - node.size() - 1);
    if (const auto colon = name.rfind("::"); colon != std::string::npos) name.erase(0, colon + 2);
  }
  return name;
}

// "cudaLaunchKernel", "cudaMemcpyAsync", "cuLaunchKernel": a CUDA runtime or driver call.
bool cuda_api_call(const std::string& name) {
  return name.rfind("cuda", 0) == 0 ||
         (name.size() > 2 && name.rfind("cu", 0) == 0 && std::isupper(static_cast<unsigned char>(name[2])));
}

// The CPU operators, each with its self time (its time less that of the operators it called,
// on its own thread) and its call site: the outermost operator around it on that thread (what
// the model code or autograd called) and its own tensor inputs.
struct CpuOps {
  std::vector<std::string> name, site;
  std::vector<double> self_ns;
  std::map<uint64_t, size_t> by_correlation;  // correlation id -> index
  std::set<uint64_t> threads;
};

CpuOps cpu_ops(const std::vector<torch::autograd::profiler::KinetoEvent>& events) {
  struct Ev {
    uint64_t t0, t1, thread;
    const torch::autograd::profiler::KinetoEvent* e;
  };
  std::vector<Ev> evs;
  for (const auto& e : events)
    if (e.deviceType() == c10::DeviceType::CPU && !e.isAsync() && e.endNs() > e.startNs())
      evs.push_back({e.startNs(), e.endNs(), e.startThreadId(), &e});
  // Per thread by start, outer before inner; a stack of open operators gives each one's parent.
  std::sort(evs.begin(), evs.end(), [](const Ev& a, const Ev& b) {
    return a.thread != b.thread ? a.thread < b.thread : a.t0 != b.t0 ? a.t0 < b.t0 : a.t1 > b.t1;
  });
  CpuOps ops;
  ops.self_ns.resize(evs.size());
  std::vector<size_t> open;
  for (size_t i = 0; i < evs.size(); ++i) {
    while (!open.empty() && (evs[open.back()].thread != evs[i].thread || evs[open.back()].t1 <= evs[i].t0))
      open.pop_back();
    ops.self_ns[i] = static_cast<double>(evs[i].t1 - evs[i].t0);
    if (!open.empty())
      ops.self_ns[open.back()] -= static_cast<double>(std::min(evs[i].t1, evs[open.back()].t1) - evs[i].t0);
    std::string name = short_op_name(evs[i].e->name());
    const std::string root = open.empty() ? name : ops.name[open.front()];
    const std::string inputs = input_text(*evs[i].e);
    ops.site.push_back((root == name ? name : root + " > " + name) + (inputs.empty() ? "" : " " + inputs));
    ops.name.push_back(std::move(name));
    // A kernel's linked correlation id is that of the operator that launched it. The CUDA
    // runtime's and driver's own events (cudaLaunchKernel, cuLaunchKernel) count their
    // correlation ids separately: they stay out of the map.
    if (!cuda_api_call(ops.name.back())) ops.by_correlation.emplace(evs[i].e->correlationId(), i);
    ops.threads.insert(evs[i].thread);
    open.push_back(i);
  }
  return ops;
}

}  // namespace

std::string profile_ops(c10::Device device, const std::function<void()>& work, int top, const std::string& json_path,
                        int runs) {
  MD_CHECK(device.is_cuda() || device.is_cpu(), "--profile: CPU or CUDA devices only, got {}", device.str());
  MD_CHECK(runs >= 1, "profile_ops: runs must be >= 1, got {}", runs);
  // Kineto logs an error when it finds no GPU; that is no error for a CPU profile (a user's
  // own KINETO_LOG_LEVEL stays as it is).
  if (device.is_cpu()) setenv("KINETO_LOG_LEVEL", "5", /*overwrite=*/0);
  namespace prof = torch::profiler::impl;
  const prof::ProfilerConfig config(prof::ProfilerState::KINETO, /*report_input_shapes=*/true);
  std::set<prof::ActivityType> activities{prof::ActivityType::CPU};
  if (device.is_cuda()) activities.insert(prof::ActivityType::CUDA);
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
  const auto t0 = std::chrono::steady_clock::now();
  work();
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const auto result = torch::autograd::profiler::disableProfiler();
  const auto& events = result->events();
  const CpuOps ops = cpu_ops(events);
  if (device.is_cpu()) {
    std::map<std::string, Sum> by_name, by_site;
    double total_ns = 0;
    for (size_t i = 0; i < ops.name.size(); ++i) {
      const double ns = std::max(ops.self_ns[i], 0.0);
      for (auto* m : {&by_name, &by_site}) {
        auto& s = (*m)[m == &by_name ? ops.name[i] : ops.site[i]];
        s.ns += ns;
        s.count += 1;
      }
      total_ns += ns;
    }
    if (!json_path.empty())
      write_profile_json(json_path, device, "CPU operator (self time)", runs, ops.threads.size(), wall_ms, total_ns, by_name, by_site);
    return table(by_name, total_ns, top, "CPU operator (self time)") +
           fmt::format("operators {:.1f} ms on {} threads in {:.1f} ms wall, {} calls, {} distinct\n",
                       total_ns / 1e6, ops.threads.size(), wall_ms, ops.name.size(), by_name.size()) +
           "\nThe same self times by call site (outermost operator > operator, its tensor inputs):\n" +
           table(by_site, total_ns, top, "call site");
  }

  // Kernels, copies and memsets on the GPU, by name and by the CPU operator that launched them.
  std::map<std::string, Sum> by_name, by_site;
  double total_ns = 0;
  for (const auto& e : events) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;
    const double ns = static_cast<double>(e.durationNs());
    const auto op = ops.by_correlation.find(e.linkedCorrelationId());
    const std::string site = op == ops.by_correlation.end() ? "(no CPU operator)" : ops.site[op->second];
    for (auto* m : {&by_name, &by_site}) {
      auto& s = (*m)[m == &by_name ? e.name() : site];
      s.ns += ns;
      s.count += 1;
    }
    total_ns += ns;
  }
  if (!json_path.empty())
    write_profile_json(json_path, device, "device activity", runs, ops.threads.size(), wall_ms, total_ns, by_name, by_site);
  std::string out = table(by_name, total_ns, top, "device activity");
  int64_t launches = 0;
  for (const auto& [name, s] : by_name) launches += s.count;
  out += fmt::format("device busy {:.1f} ms of {:.1f} ms wall ({:.0f}%), {} device activities, {} distinct\n",
                     total_ns / 1e6, wall_ms, 100 * total_ns / 1e6 / std::max(wall_ms, 1e-9), launches,
                     by_name.size());
  out += "\nThe same device time by call site (outermost CPU operator > the operator that launched it, its "
         "tensor inputs):\n" +
         table(by_site, total_ns, top, "call site");
  return out;
}

}  // namespace microdit
