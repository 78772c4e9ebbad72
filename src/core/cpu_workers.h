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
// order from a shared counter, and returns when all are done. Rethrows the first worker's
// exception after all have ended. The threads are the process's own, started on first use
// and kept for later calls (so their caches stay warm from one training step to the next);
// callers on several threads take turns. workers <= 1, or a call from inside a task, runs the
// tasks in the calling thread. The process's intra-op thread count is left as it was. Between
// jobs a thread polls for the next for 2 ms (yielding its core) before it sleeps: a training
// step's jobs come a few hundred microseconds apart, and waking a sleeping thread took up to
// milliseconds in a virtual machine (docs/performance.md, "Session 33").
void run_cpu_workers(int workers, int64_t tasks, const std::function<void(int64_t)>& task);

// fn over [begin, end) in up to at::get_num_threads() contiguous chunks of at least `grain`
// elements, one in the calling thread and the others on the pool's threads: microdit is built
// without OpenMP, so at::parallel_for in its sources runs the whole range on the calling thread.
// Runs fn(begin, end) in the calling thread when one chunk would do, inside a task of the pool
// (or of the caller's own chunk), or while the pool runs another caller's work (never waits for
// it). Used by the CPU AdamW pass; the other kernels run inside the workers and keep
// at::parallel_for (docs/performance.md, "Session 32": the pool next to ATen's OpenMP threads).
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace microdit
