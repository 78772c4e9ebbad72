// `microdit train --nproc N`: N local workers of this same program, started through the same
// environment rendezvous that torchrun uses (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
// MASTER_PORT on a free port), for people without torchrun.
#pragma once
#include <string>
#include <vector>

namespace microdit::dist {

// This process's command line (from /proc/self/cmdline) without `--nproc N` / `--nproc=N`.
std::vector<std::string> own_args_without_nproc();

// A free TCP port on 127.0.0.1 (bound once and released).
int free_port();

// Starts `nproc` copies of /proc/self/exe with `args` (args[0] is the program name) and waits.
// When one fails, the others are stopped (SIGTERM, SIGKILL after 10 s) and an Error names the
// failed rank. threads_per_worker > 0 sets OMP_NUM_THREADS for the workers.
void launch_local(int nproc, const std::vector<std::string>& args, int threads_per_worker);

}  // namespace microdit::dist
