#include "cli/commands.h"
#include "core/cpu_matmul.h"
#include "core/choice.h"
#include "core/error.h"
#include "kernels/fused.h"
#include "model/attention.h"
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
         "matrix products on the CPU: auto (microdit on CPUs with AVX-512, else mkl on "
         "Intel CPUs and onednn on others), onednn, mkl (LibTorch's own choice) or microdit "
         "(its own AVX-512 kernels for float32 products of 256 columns or more, MKL on Intel CPUs and "
         "oneDNN on others for the rest; under bf16 autocast its own AVX512-BF16 kernels for every "
         "product on CPUs without AMX). With onednn or mkl bf16 products are autocast's (oneDNN)")
      ->default_str("auto");
  cmd.add_option_function<std::string>(
         "--pack-weights",
         [](const std::string& v) { set_pack_weights(parse_choice<bool>("--pack-weights", v, {{"on", true}, {"off", false}})); },
         "microdit's bf16 products on the CPU: on (each weight rounded and laid out for the kernels once "
         "per training step, for all CPU workers, and once per sampling run) or off (at every product, "
         "for comparison); the same values either way")
      ->default_str("on");
  cmd.add_option_function<std::string>(
         "--cpu-attention", [](const std::string& v) { set_cpu_attention(parse_cpu_attention(v)); },
         "attention on the CPU: auto (under bf16 autocast bf16 on AMX tiles where the CPU has AMX, "
         "in AVX512-BF16 where it has that, else float32), float32 (microdit's kernels on AVX-512 "
         "CPUs, else ATen's), aten-float32 (ATen's), or bf16 (under bf16 autocast ATen's both ways; slow on CPUs but keeps what a GPU keeps)")
      ->default_str("auto");
  cmd.add_option_function<std::string>(
         "--fused-kernels",
         [](const std::string& v) {
           // "warp" is the name "on" had while the warp-per-row kernels were not yet the default.
           enum { on, off, block };
           const auto m = parse_choice<int>("--fused-kernels", v,
                                            {{"on", on}, {"off", off}, {"block", block}, {"warp", on}});
           set_fused_kernels(m != off);
           kernels::set_warp_row_kernels(m == on);
         },
         "fused kernels (CPU and CUDA) for LayerNorm + modulation, the gated residual adds and SwiGLU: "
         "on, off, or block (on, but CUDA rows taken by a block of threads, not a warp: slower, for "
         "comparison)")
      ->default_str("on");
  cmd.add_option_function<std::string>(
         "--moe-dispatch", [](const std::string& v) { set_moe_dispatch(parse_moe_dispatch(v)); },
         "how expert-choice layers gather tokens and sum the experts' outputs: auto (gather on CUDA, or gemm "
         "without the fused kernels; on the CPU index for training, gather for sampling), index (index_select / index_add), gemm (products "
         "with the one-hot routing matrix) or gather (a gather into the experts' layout and one sum per "
         "token, no atomics)")
      ->default_str("auto");
  cmd.add_option_function<std::string>(
         "--recompute-ffn", [](const std::string& v) { set_recompute_ffn(parse_recompute_ffn(v)); },
         "recompute the feed-forward layers' activations in the backward pass instead of keeping "
         "them: off, cuda (on CUDA tensors) or always")
      ->default_str("cuda");
}

void add_precision_option(CLI::App& cmd, std::string& precision) {
  cmd.add_option("--precision", precision,
                 "the network's precision while sampling: auto (bf16 autocast on CUDA and on CPUs with "
                 "AVX512-BF16 or AMX, where it is 1.5-2x faster; float32 elsewhere), bf16 or fp32. "
                 "The sampler's own state stays float64")
      ->capture_default_str();
}

}  // namespace microdit::cli
