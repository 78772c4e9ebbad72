// Data parallelism on c10d: who this process is (from torchrun's, SLURM's or our own launcher's
// environment) and the collectives the trainer needs, on Gloo (CPU) or NCCL (CUDA).
// Only dist/comm.cpp sees ProcessGroupGloo/ProcessGroupNCCL; the rest uses Comm.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <memory>
#include <string>

namespace microdit::dist {

using at::Tensor;

// The process's place in the job. world == 1 (nothing set): plain single-process training.
struct Env {
  int rank = 0, world = 1, local_rank = 0, local_world = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool agent_store = false;   // torchrun: its agent serves the TCPStore, every worker is a client
  std::string restart = "0";  // TORCHELASTIC_RESTART_COUNT: keys of an earlier attempt are ignored
  std::string launcher;       // "env" (RANK/WORLD_SIZE, torchrun or microdit --nproc), "slurm", ""
  bool force = false;         // MICRODIT_FORCE_PG=1: a process group even for one rank (to time
                              // the data-parallel code path against the plain trainer)
  bool distributed() const { return world > 1 || force; }
};

// RANK/WORLD_SIZE/LOCAL_RANK(/LOCAL_WORLD_SIZE) and MASTER_ADDR/MASTER_PORT; without RANK, SLURM's
// SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the first host of SLURM_JOB_NODELIST and a port
// derived from SLURM_JOB_ID. Inconsistent values are an error naming the variable.
Env env_from_environment();
// First host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03".
std::string first_slurm_host(const std::string& nodelist);

// CUDA: cuda:(local_rank % device count) (binds it as the current device); CPU unchanged.
c10::Device rank_device(const Env& env, c10::Device requested);

using Work = c10::intrusive_ptr<c10d::Work>;

// A process group: Gloo for CPU tensors, NCCL for CUDA tensors. Collectives are asynchronous;
// call wait() on the returned work (NCCL: makes the current stream wait).
class Comm {
 public:
  static std::unique_ptr<Comm> connect(const Env& env, c10::Device device, std::chrono::seconds timeout);
  ~Comm();
  int rank() const { return rank_; }
  int world() const { return world_; }
  const char* backend_name() const;
  Work allreduce(Tensor& t);                        // sum, in place
  Work reduce_scatter(Tensor& out, Tensor& in);     // sum: out = slice rank of sum(in), in = world * out
  Work allgather(Tensor& out, Tensor& in);          // out = cat over ranks of in
  Work broadcast(Tensor& t, int root = 0);
  void wait(Work& w);
  double sum(double v);  // allreduce of one number
  void barrier();
  // Final barrier, then the group, then the store (rank 0's store server outlives the others).
  void shutdown();

 private:
  struct Impl;
  explicit Comm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, world_ = 1;
};

}  // namespace microdit::dist
