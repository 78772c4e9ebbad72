// Helpers shared by the GoogleTest files.
#pragma once
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/cuda.h>
#include <torch/types.h>

#include "core/error.h"
#include "core/fs.h"
#include "model/config.h"

namespace microdit::test_util {

// The checkout the tests were built from (tests/source_dir.cpp).
const char* source_dir();

// A fresh folder under /tmp (mkdtemp), removed with its contents at the end of the scope.
// Not std::filesystem::remove_all: LibTorch exports a broken copy that can shadow libstdc++'s.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/microdit_test_XXXXXX";
    const char* made = ::mkdtemp(tmpl);
    path = made ? made : "";
    if (!made) throw std::runtime_error("cannot create a temporary folder under /tmp");
  }
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path + "'").c_str()); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& f) const { return path + "/" + f; }
};

// The CPU, and the first GPU when LibTorch sees one: for tests of code paths that differ there.
inline std::vector<c10::Device> test_devices() {
  std::vector<c10::Device> d{c10::Device(c10::kCPU)};
  if (torch::cuda::is_available()) d.emplace_back(c10::kCUDA, 0);
  return d;
}

// The largest difference of two lists of tensors (a[i] against b[i]), relative to each of a's
// largest magnitude (at least `floor`).
inline double worst_relative_difference(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b,
                                        double floor = 1e-3) {
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    worst = std::max(worst, (a[i] - b[i]).abs().max().item<double>() / std::max(floor, a[i].abs().max().item<double>()));
  return worst;
}

// A process-wide mode (fused kernels, MoE dispatch, CPU matmul, ...) set for one scope and
// restored after it, also when an assertion ends the test early:
//   const ScopedSetting dispatch(moe_dispatch, set_moe_dispatch, MoeDispatch::gemm);
template <class T>
class ScopedSetting {
 public:
  ScopedSetting(T (*get)(), void (*set)(T), T value) : set_(set), was_(get()) { set_(value); }
  ~ScopedSetting() { set_(was_); }
  ScopedSetting(const ScopedSetting&) = delete;
  ScopedSetting& operator=(const ScopedSetting&) = delete;

 private:
  void (*set_)(T);
  T was_;
};

// The folder of the running test binary (the build folder): where generated fixtures go,
// whatever the working directory (ctest runs in the build folder, a developer maybe not).
inline std::string build_dir() {
  char buf[4096];
  const auto n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  const std::string exe(buf, static_cast<size_t>(n));
  return exe.substr(0, exe.rfind('/'));
}

// The message of the microdit::Error that f throws, or "" when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A whole file's bytes ("" when it cannot be read).
inline std::string read_file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// The value of `key` ("loss", "grad_norm", ...) in every line of a metrics.jsonl that has it, in order.
inline std::vector<double> metric_values(const std::string& metrics, const std::string& key) {
  std::ifstream in(metrics);
  std::vector<double> out;
  const std::string field = "\"" + key + "\": ";
  for (std::string line; std::getline(in, line);)
    if (auto p = line.find(field); p != std::string::npos) out.push_back(std::stod(line.substr(p + field.size())));
  return out;
}

// The "loss" of every training line of a metrics.jsonl, in order.
inline std::vector<double> metric_losses(const std::string& metrics) { return metric_values(metrics, "loss"); }

// Python of the mosaicml-streaming venv made by scripts/setup_data.sh ($MICRODIT_STREAMING_VENV,
// else the finished one in the per-user cache), or "" when there is none.
inline std::string streaming_python() {
  if (const char* v = std::getenv("MICRODIT_STREAMING_VENV"); v && *v)
    return is_regular_file(std::string(v) + "/bin/python") ? std::string(v) + "/bin/python" : "";
  const char* cache = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  const std::string root = cache && *cache ? std::string(cache) : std::string(home ? home : "") + "/.cache";
  for (const auto& name : list_dir(root + "/microdit")) {
    if (name.rfind("venv-streaming0.13.0-py", 0) != 0) continue;
    const std::string dir = root + "/microdit/" + name;
    for (const auto& f : list_dir(dir))
      if (f.rfind(".complete-", 0) == 0 && is_regular_file(dir + "/bin/python")) return dir + "/bin/python";
  }
  return "";
}

// A MicroDiT small enough for unit tests: Pico at 8x8, 16-wide captions, 2 backbone blocks.
inline ModelConfig tiny_config() {
  auto c = preset("MicroDiT_Pico_2");
  c.input_size = 8;
  c.caption_channels = 16;
  c.depth = 2;
  return c;
}

// Small random weights everywhere: the reference's zero-initialised output layers would make
// most gradients and outputs zero, hiding differences between two ways of computing them.
inline void small_random_weights(torch::nn::Module& model) {
  torch::NoGradGuard ng;
  for (auto& p : model.parameters()) p.copy_(torch::randn(p.sizes()) * 0.05);
}

}  // namespace microdit::test_util
