#include "core/cpu_workers.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>
#include <vector>

namespace microdit {

void run_cpu_workers(int workers, int64_t tasks, const std::function<void(int64_t)>& task) {
  const int n = static_cast<int>(std::min<int64_t>(std::max(workers, 1), tasks));
  if (n <= 1) {
    for (int64_t k = 0; k < tasks; ++k) task(k);
    return;
  }
  const int threads = at::get_num_threads();
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> pool;
  const at::ThreadLocalState caller;  // grad mode, autocast, ... as on the calling thread
  for (int w = 0; w < n; ++w)
    pool.emplace_back([&, w] {
      try {
        at::ThreadLocalStateGuard same_state(caller);
        at::set_num_threads(1);  // this worker's OpenMP / MKL threads
        for (int64_t k; (k = next++) < tasks;) task(k);
      } catch (...) {
        errors[w] = std::current_exception();
      }
    });
  for (auto& t : pool) t.join();
  at::set_num_threads(threads);  // set_num_threads in a worker changes the process default
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace microdit
