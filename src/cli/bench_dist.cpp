// microdit bench-dist [--nproc N] [--sizes-mb 1,4,16,64] [--iters K]: all-reduce bandwidth of
// the data-parallel process group (Gloo on CPU, NCCL on CUDA), run under torchrun/srun or with
// --nproc N local workers.
#include <chrono>
#include <cstdio>
#include <thread>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "dist/dist.h"
#include "dist/launch.h"

#ifdef __has_include
#if __has_include(<torch/cuda.h>)
#include <torch/cuda.h>
#endif
#endif

namespace microdit::cli {

namespace {

struct BenchDistOptions {
  RuntimeOptions rt;
  int nproc = 0, iters = 10, timeout = 300;
  std::vector<double> sizes_mb{1, 4, 16, 64};
};

void bench_rank(const BenchDistOptions& o, const dist::Env& env) {
  set_threads(o.rt.threads);
  const auto device = dist::rank_device(env, resolve_device(o.rt.device));
  auto comm = dist::Comm::connect(env, device, std::chrono::seconds(o.timeout));
  const int W = comm->world();
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  if (comm->rank() == 0)
    fmt::print("all-reduce (sum, fp32), {} ranks, {} on {}; {} timed ops after 2 warm-ups\n", W,
               comm->backend_name(), device.str(), o.iters);
  for (double mb : o.sizes_mb) {
    const int64_t n = static_cast<int64_t>(mb * (1 << 20) / 4);
    auto t = at::ones({n}, at::TensorOptions().dtype(at::kFloat).device(device));
    for (int i = 0; i < 2; ++i) comm->allreduce(t)->wait();
    sync();
    comm->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < o.iters; ++i) comm->allreduce(t)->wait();
    sync();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / o.iters;
    const double bytes = 4.0 * n;
    if (comm->rank() == 0)
      fmt::print("{:8.1f} MB  {:9.3f} ms/op  algbw {:7.2f} GB/s  busbw {:7.2f} GB/s\n", bytes / (1 << 20), s * 1e3,
                 bytes / s / 1e9, bytes / s / 1e9 * 2.0 * (W - 1) / W);
  }
  comm->shutdown();
}

}  // namespace

void register_bench_dist(CLI::App& app) {
  auto o = std::make_shared<BenchDistOptions>();
  auto* cmd = app.add_subcommand("bench-dist", "all-reduce bandwidth of the data-parallel process group");
  cmd->add_option("--nproc", o->nproc, "start N local workers (else run under torchrun or srun)");
  cmd->add_option("--iters", o->iters, "timed all-reduces per size")->capture_default_str();
  cmd->add_option("--sizes-mb", o->sizes_mb, "message sizes in MB")->delimiter(',');
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] {
    if (o->nproc > 0) {
      MD_CHECK(std::getenv("RANK") == nullptr, "--nproc cannot be used inside a launched job (RANK is set)");
      const int cores = static_cast<int>(std::thread::hardware_concurrency());
      dist::launch_local(o->nproc, dist::own_args_without_nproc(), o->rt.threads > 0 ? 0 : std::max(1, cores / o->nproc));
      return;
    }
    const auto env = dist::env_from_environment();
    MD_CHECK(env.distributed(), "bench-dist needs several ranks: pass --nproc N or run under torchrun/srun");
    if (env.rank != 0) std::freopen("/dev/null", "w", stdout);
    bench_rank(*o, env);
  });
}

}  // namespace microdit::cli
