// The one translation unit that sees Gloo and NCCL (docs/distributed.md).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define MICRODIT_HAVE_NCCL 1
#endif

#include <cstdlib>

#include "core/error.h"
#include "dist/dist.h"

namespace microdit::dist {

namespace {

std::string env_str(const char* k, const std::string& dflt = "") {
  const char* v = std::getenv(k);
  return v && *v ? std::string(v) : dflt;
}

int env_int(const char* k, int dflt) {
  const std::string s = env_str(k);
  if (s.empty()) return dflt;
  size_t used = 0;
  int v = 0;
  try {
    v = std::stoi(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MD_CHECK(used > 0, "environment variable {}='{}' is not an integer", k, s);
  return v;
}

}  // namespace

std::string first_slurm_host(const std::string& list) {
  const auto bracket = list.find('['), comma = list.find(',');
  if (bracket == std::string::npos || (comma != std::string::npos && comma < bracket))
    return list.substr(0, comma);
  const auto end = list.find_first_of(",-]", bracket + 1);
  return list.substr(0, bracket) + list.substr(bracket + 1, end - bracket - 1);
}

Env env_from_environment() {
  Env e;
  if (!env_str("RANK").empty() || !env_str("WORLD_SIZE").empty()) {
    MD_CHECK(!env_str("RANK").empty() && !env_str("WORLD_SIZE").empty(),
             "RANK and WORLD_SIZE must be set together (got RANK='{}', WORLD_SIZE='{}')",
             env_str("RANK"), env_str("WORLD_SIZE"));
    e.launcher = "env";
    e.rank = env_int("RANK", 0);
    e.world = env_int("WORLD_SIZE", 1);
    e.local_rank = env_int("LOCAL_RANK", e.rank);
    e.local_world = env_int("LOCAL_WORLD_SIZE", e.world);
    e.agent_store = env_str("TORCHELASTIC_USE_AGENT_STORE") == "True";
    e.restart = env_str("TORCHELASTIC_RESTART_COUNT", "0");
    e.master_addr = env_str("MASTER_ADDR", "127.0.0.1");
    e.master_port = env_int("MASTER_PORT", 29500);
  } else if (!env_str("SLURM_PROCID").empty() && env_int("SLURM_NTASKS", 1) > 1) {
    e.launcher = "slurm";
    e.rank = env_int("SLURM_PROCID", 0);
    e.world = env_int("SLURM_NTASKS", 1);
    e.local_rank = env_int("SLURM_LOCALID", 0);
    e.local_world = env_int("SLURM_NTASKS_PER_NODE", 1);  // "8(x2)" reads as 8
    const std::string nodes = env_str("SLURM_STEP_NODELIST", env_str("SLURM_JOB_NODELIST"));
    e.master_addr = env_str("MASTER_ADDR", nodes.empty() ? "127.0.0.1" : first_slurm_host(nodes));
    e.master_port = env_int("MASTER_PORT", 20000 + env_int("SLURM_JOB_ID", 0) % 10000);
    e.restart = env_str("SLURM_RESTART_COUNT", "0");
  }
  e.force = env_str("MICRODIT_FORCE_PG") == "1";
  MD_CHECK(e.world >= 1, "WORLD_SIZE {} must be >= 1", e.world);
  MD_CHECK(e.rank >= 0 && e.rank < e.world, "RANK {} is outside [0, WORLD_SIZE {})", e.rank, e.world);
  MD_CHECK(e.local_rank >= 0, "LOCAL_RANK {} must be >= 0", e.local_rank);
  MD_CHECK(e.master_port > 0 && e.master_port < 65536, "MASTER_PORT {} is not a port", e.master_port);
  return e;
}

c10::Device rank_device(const Env& env, c10::Device requested) {
  if (!requested.is_cuda()) return requested;
#ifdef MICRODIT_HAVE_NCCL
  const int n = c10::cuda::device_count();
  MD_CHECK(n > 0, "rank {}: no CUDA device", env.rank);
  const auto idx = static_cast<c10::DeviceIndex>(env.local_rank % n);
  c10::cuda::set_device(idx);  // before any CUDA work of this rank
  return c10::Device(c10::kCUDA, idx);
#else
  fail("rank {}: this build has no NCCL (nccl.h was not found at configure time)", env.rank);
#endif
}

struct Comm::Impl {
  c10::Device device{c10::kCPU};
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  bool nccl = false;
};

Comm::Comm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Comm::~Comm() = default;

std::unique_ptr<Comm> Comm::connect(const Env& env, c10::Device device, std::chrono::seconds timeout) {
  auto impl = std::make_unique<Impl>();
  impl->device = device;
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  so.isServer = env.rank == 0 && !env.agent_store;
  so.numWorkers = env.world;
  so.timeout = timeout;
  try {
    impl->store = c10::make_intrusive<c10d::PrefixStore>(
        "microdit/" + env.restart, c10::make_intrusive<c10d::TCPStore>(env.master_addr, so));
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    fail("rank {}: cannot reach the rendezvous store at {}:{} ({})", env.rank, env.master_addr,
         env.master_port, msg.substr(0, msg.find('\n')));
  }
  if (device.is_cuda()) {
#ifdef MICRODIT_HAVE_NCCL
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl->store, env.rank, env.world, opts);
    pg->setBoundDeviceId(device);
    pg->eagerConnectSingleDevice(device);
    impl->pg = pg;
    impl->nccl = true;
#else
    fail("rank {}: this build has no NCCL", env.rank);
#endif
  } else {
    auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);  // GLOO_SOCKET_IFNAME
    impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, env.rank, env.world, opts);
  }
  std::unique_ptr<Comm> c(new Comm(std::move(impl)));
  c->rank_ = env.rank;
  c->world_ = env.world;
  return c;
}

const char* Comm::backend_name() const { return impl_->nccl ? "NCCL" : "Gloo"; }

Work Comm::allreduce(Tensor& t) {
  std::vector<Tensor> v{t};
  return impl_->pg->allreduce(v);
}

Work Comm::reduce_scatter(Tensor& out, Tensor& in) {
  c10d::ReduceScatterOptions o;
  return impl_->pg->_reduce_scatter_base(out, in, o);
}

Work Comm::allgather(Tensor& out, Tensor& in) { return impl_->pg->_allgather_base(out, in); }

Work Comm::broadcast(Tensor& t, int root) {
  std::vector<Tensor> v{t};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  return impl_->pg->broadcast(v, o);
}

void Comm::wait(Work& w) { w->wait(); }

double Comm::sum(double v) {
  auto t = at::full({1}, v, at::TensorOptions().dtype(at::kDouble).device(impl_->device));
  allreduce(t)->wait();
  return t.item<double>();
}

void Comm::barrier() { impl_->pg->barrier()->wait(); }

void Comm::shutdown() {
  if (!impl_->pg) return;
  barrier();
  impl_->pg->shutdown();
  impl_->pg.reset();
  impl_->store.reset();
}

}  // namespace microdit::dist
