#include "cli/commands.h"
#include "core/cpu_matmul.h"
#include "core/error.h"
#include "model/ffn.h"
#include "model/layers.h"

namespace microdit::cli {

void add_runtime_options(CLI::App& cmd, RuntimeOptions& rt) {
  cmd.add_option("--device", rt.device, "cpu, cuda, cuda:N or auto (CUDA when LibTorch sees a GPU)")
      ->capture_default_str();
  cmd.add_option("--threads", rt.threads, "CPU threads for LibTorch (0: all cores)")
      ->capture_default_str();
  cmd.add_option_function<std::string>(
         "--cpu-matmul", [](const std::string& name) { set_cpu_fp32_matmul(parse_cpu_matmul(name)); },
         "float32 matrix products on the CPU: auto (mkl on Intel CPUs, onednn on others), onednn "
         "or mkl (LibTorch's own choice)")
      ->default_str("auto");
  cmd.add_option_function<std::string>(
         "--fused-kernels",
         [](const std::string& v) {
           MD_CHECK(v == "on" || v == "off", "--fused-kernels: expected on or off, got '{}'", v);
           set_fused_kernels(v == "on");
         },
         "fused kernels (CPU and CUDA) for LayerNorm + modulation and the gated residual adds: on or off")
      ->default_str("on");
  cmd.add_option_function<std::string>(
         "--recompute-ffn", [](const std::string& v) { set_recompute_ffn(parse_recompute_ffn(v)); },
         "recompute the feed-forward layers' activations in the backward pass instead of keeping "
         "them: off, cuda (on CUDA tensors) or always")
      ->default_str("cuda");
}

}  // namespace microdit::cli
