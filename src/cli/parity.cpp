// microdit parity --vectors FILE: recompute a reference vector file and compare.
#include <fmt/format.h>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "eval/parity.h"

namespace microdit::cli {

namespace {

struct ParityOptions {
  RuntimeOptions rt;
  std::string vectors;
  bool cuda_graph = false;
};

void run(const ParityOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  MD_CHECK(!o.cuda_graph || device.is_cuda(), "--cuda-graph needs --device cuda");
  auto rep = run_parity(o.vectors, device, o.cuda_graph);
  const auto& c = rep.config;
  fmt::print("{}\n", runtime_summary(device));
  fmt::print("vectors: {}\n", o.vectors);
  fmt::print("model: input {} patch {} C {} dim {} depth {} head_dim {} mixer {}x{} experts {} "
             "(capacity {}, every {}) bias {}\n",
             c.input_size, c.patch_size, c.in_channels, c.dim, c.depth, c.head_dim,
             c.patch_mixer_depth, c.patch_mixer_dim, c.num_experts, c.expert_capacity,
             c.experts_every_n, c.use_bias);
  fmt::print("{:<64} {:>12} {:>10}  {}\n", "key", "rel. error", "tolerance", "result");
  int failed = 0, skipped = 0;
  for (const auto& r : rep.rows) {
    const char* verdict = !r.checked ? "SKIP (unknown output)" : (r.pass() ? "ok" : "FAIL");
    failed += !r.pass();
    skipped += !r.checked;
    fmt::print("{:<64} {:>12.3e} {:>10.0e}  {}\n", r.key, r.error, r.tolerance, verdict);
  }
  fmt::print("{} rows: {} passed, {} failed, {} skipped\n", rep.rows.size(),
             rep.rows.size() - failed - skipped, failed, skipped);
  MD_CHECK(failed == 0, "parity: {} of {} rows exceed their tolerance", failed, rep.rows.size());
}

}  // namespace

void register_parity(CLI::App& app) {
  auto o = std::make_shared<ParityOptions>();
  auto* cmd = app.add_subcommand("parity", "check the network against reference parity vectors");
  cmd->add_option("--vectors", o->vectors, "safetensors file in the shared/reference format")
      ->required();
  cmd->add_flag("--cuda-graph", o->cuda_graph, "check the sampler through its CUDA-graph path");
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
