#include "cli/commands.h"

namespace microdit::cli {

void add_runtime_options(CLI::App& cmd, RuntimeOptions& rt) {
  cmd.add_option("--device", rt.device, "cpu, cuda, cuda:N or auto (CUDA when LibTorch sees a GPU)")
      ->capture_default_str();
  cmd.add_option("--threads", rt.threads, "CPU threads for LibTorch (0: all cores)")
      ->capture_default_str();
}

}  // namespace microdit::cli
