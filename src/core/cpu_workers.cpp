#include "core/cpu_workers.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace microdit {

namespace {

// The process's workers: threads started on first use and kept, each with one intra-op
// thread. A call hands them one job (a task function and a task count) and waits for it.
// Keeping the threads keeps what each has built up: malloc's per-thread caches, the kernels'
// thread-local buffers, the intra-op setting; a thread started per call (as until session 32)
// paid for them again at every training step. Not c10::ThreadPool: it has a fixed size, waits
// for all of its work rather than one job's, and logs a task's exception instead of handing it
// back.
struct Pool {
  std::mutex call_mu;  // one job at a time (callers from several threads take turns)
  std::mutex mu;       // guards the fields below
  std::condition_variable wake, finished;
  std::vector<std::thread> threads;
  uint64_t generation = 0;  // bumped for each job
  int taking_part = 0;      // workers [0, taking_part) run the current job
  // generation and taking_part as last published under mu, for workers that poll before they
  // sleep (wait_for_job).
  std::atomic<uint64_t> posted{0};
  std::atomic<int> posted_taking_part{0};
  int running = 0;          // of those, not yet done
  // The current job, valid while running > 0.
  const std::function<void(int64_t)>* task = nullptr;
  const at::ThreadLocalState* state = nullptr;
  int64_t tasks = 0;
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors;
};

Pool& pool() {
  static auto* p = new Pool();  // never destroyed: its threads wait in it until the process ends
  return *p;
}

thread_local bool t_worker = false;  // this thread is one of the pool's, or helps in a job now

// How long a worker that has finished a job polls for the next before it sleeps. A training
// step hands the workers several jobs a few hundred microseconds apart (the slices' passes, the
// gradient sums and norms, the AdamW pass); a worker asleep in a virtual machine took up to
// milliseconds to wake (its virtual CPU halted), so that in session 32's build the caller had
// often run a two-way parallel_for alone before the other thread woke. Polling keeps the core
// awake between those jobs; it yields the core at every poll so that the caller's own work
// between jobs is not delayed.
constexpr auto kPollBeforeSleep = std::chrono::microseconds(2000);

// Waits for a job after `seen` that this worker takes part in: polls for kPollBeforeSleep, then
// sleeps on the pool's condition variable. Returns with `lock` held.
void wait_for_job(Pool& p, int index, uint64_t seen, std::unique_lock<std::mutex>& lock) {
  const auto ready = [&] { return p.posted.load(std::memory_order_acquire) != seen &&
                                  index < p.posted_taking_part.load(std::memory_order_acquire); };
  const auto until = std::chrono::steady_clock::now() + kPollBeforeSleep;
  while (!ready() && std::chrono::steady_clock::now() < until) std::this_thread::yield();
  lock.lock();
  p.wake.wait(lock, [&] { return p.generation != seen && index < p.taking_part; });
}

void worker_loop(Pool& p, int index) {
  t_worker = true;
  // This worker's OpenMP / MKL threads: 1. get_num_threads first, as LibTorch sets a thread's
  // count from the process default at its first call (which would undo the 1 later); the 1
  // also becomes the process default, which run_cpu_workers puts back.
  (void)at::get_num_threads();
  at::set_num_threads(1);
  uint64_t seen = 0;
  for (;;) {
    std::unique_lock<std::mutex> lock(p.mu, std::defer_lock);
    wait_for_job(p, index, seen, lock);
    seen = p.generation;
    const auto* task = p.task;
    const auto* state = p.state;
    const int64_t tasks = p.tasks;
    lock.unlock();
    std::exception_ptr error;
    try {
      at::ThreadLocalStateGuard same_state(*state);
      for (int64_t k; (k = p.next.fetch_add(1)) < tasks;) (*task)(k);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    p.errors[static_cast<size_t>(index)] = error;
    if (--p.running == 0) p.finished.notify_all();
  }
}

// Runs `tasks` tasks on `threads` of the pool's threads (started where missing), the caller
// taking tasks too where `caller_helps`, and returns when all are done. The caller holds
// p.call_mu.
void run_job(Pool& p, int threads, int64_t tasks, const std::function<void(int64_t)>& task, bool caller_helps) {
  const at::ThreadLocalState caller;  // grad mode, autocast, ... as on the calling thread
  const int intra_op = at::get_num_threads();
  const bool started = static_cast<int>(p.threads.size()) < threads;
  {
    std::unique_lock<std::mutex> lock(p.mu);
    while (static_cast<int>(p.threads.size()) < threads) {
      const int index = static_cast<int>(p.threads.size());
      p.threads.emplace_back(worker_loop, std::ref(p), index);
      p.threads.back().detach();
    }
    p.errors.assign(p.threads.size(), nullptr);
    p.task = &task;
    p.state = &caller;
    p.tasks = tasks;
    p.next.store(0);
    p.taking_part = threads;
    p.running = threads;
    ++p.generation;
    p.posted_taking_part.store(threads, std::memory_order_release);
    p.posted.store(p.generation, std::memory_order_release);
  }
  p.wake.notify_all();
  std::exception_ptr own_error;
  if (caller_helps) {
    // Calls from the caller's tasks run inside them, as from a worker's (this thread holds call_mu).
    struct Helping {
      bool was = t_worker;
      Helping() { t_worker = true; }
      ~Helping() { t_worker = was; }
    } helping;
    try {
      for (int64_t k; (k = p.next.fetch_add(1)) < tasks;) task(k);
    } catch (...) {
      own_error = std::current_exception();
      p.next.store(tasks);  // the workers take no more
    }
  }
  std::unique_lock<std::mutex> lock(p.mu);
  p.finished.wait(lock, [&] { return p.running == 0; });
  p.taking_part = 0;
  p.posted_taking_part.store(0, std::memory_order_release);
  p.task = nullptr;
  p.state = nullptr;
  lock.unlock();
  // A new worker's set_num_threads(1) also changed the process default (LibTorch keeps one
  // count for new threads, MKL and its thread pool): put the caller's back.
  if (started) at::set_num_threads(intra_op);
  if (own_error) std::rethrow_exception(own_error);
  for (auto& e : p.errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace

void run_cpu_workers(int workers, int64_t tasks, const std::function<void(int64_t)>& task) {
  const int n = static_cast<int>(std::min<int64_t>(std::max(workers, 1), tasks));
  if (n <= 1 || t_worker) {  // one worker, or a worker's own call: in the calling thread
    for (int64_t k = 0; k < tasks; ++k) task(k);
    return;
  }
  auto& p = pool();
  std::lock_guard<std::mutex> call(p.call_mu);
  run_job(p, n, tasks, task, /*caller_helps=*/false);
}

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (begin >= end) return;
  const int64_t n = std::min<int64_t>(at::get_num_threads(), (end - begin + std::max<int64_t>(grain, 1) - 1) /
                                                                   std::max<int64_t>(grain, 1));
  auto& p = pool();
  std::unique_lock<std::mutex> call(p.call_mu, std::defer_lock);
  if (n <= 1 || t_worker || !call.try_lock()) {  // too little work, inside a worker, or the workers busy
    fn(begin, end);
    return;
  }
  const int64_t chunk = (end - begin + n - 1) / n;
  run_job(p, static_cast<int>(n - 1), n,
          [&](int64_t k) {
            const int64_t b = begin + k * chunk;
            if (b < end) fn(b, std::min(end, b + chunk));
          },
          /*caller_helps=*/true);
}

}  // namespace microdit
