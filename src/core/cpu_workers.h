// Side-by-side CPU work on single-threaded workers.
//
// On a few-core CPU the small kernels of a MicroDiT step scale poorly across intra-op
// threads (1 thread reaches 56-66 % of what 2 reach on Nano), while independent pieces of
// work (sampling chunks, row slices of a training batch) scale almost linearly. So instead
// of one stream of work on T intra-op threads, run T streams on one thread each.
#pragma once
#include <cstdint>
#include <functional>

namespace microdit {

// Runs task(0) ... task(tasks - 1) on min(workers, tasks) threads, each with one intra-op
// thread and the caller's thread-local state (grad mode, autocast, ...), taking tasks in
// order from a shared counter. Rethrows the first task's exception after all threads end.
// Restores the process's intra-op thread count afterwards. workers <= 1 runs in the caller.
void run_cpu_workers(int workers, int64_t tasks, const std::function<void(int64_t)>& task);

}  // namespace microdit
