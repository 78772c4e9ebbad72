// The persistent CPU worker pool (core/cpu_workers.h).
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/cpu_workers.h"

using microdit::run_cpu_workers;

TEST(CpuWorkers, EachTaskRunsOnceOnThreadsKeptAcrossCalls) {
  // A thread's own count of the tasks it ran: it outlives a call only where the thread does
  // (thread ids alone would not tell: the system reuses them for new threads).
  static thread_local int64_t t_ran = 0;
  std::atomic<int64_t> most{0};
  for (int call = 0; call < 50; ++call) {
    std::vector<std::atomic<int>> runs(37);
    run_cpu_workers(3, 37, [&](int64_t k) {
      runs[static_cast<size_t>(k)]++;
      const int64_t ran = ++t_ran;
      for (int64_t m = most.load(); ran > m && !most.compare_exchange_weak(m, ran);) {
      }
    });
    for (auto& r : runs) ASSERT_EQ(r.load(), 1);
  }
  EXPECT_GT(most.load(), 37);  // a thread ran tasks of more than one call
  EXPECT_EQ(t_ran, 0);         // none in the caller
}

TEST(CpuWorkers, TasksRunWithOneIntraOpThreadAndTheCallersState) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  torch::NoGradGuard no_grad;
  std::atomic<int> wrong_threads{0}, grad_on{0};
  for (int call = 0; call < 5; ++call)
    run_cpu_workers(2, 8, [&](int64_t) {
      if (at::get_num_threads() != 1) wrong_threads++;
      if (torch::GradMode::is_enabled()) grad_on++;
    });
  EXPECT_EQ(wrong_threads.load(), 0);
  EXPECT_EQ(grad_on.load(), 0);
  EXPECT_EQ(at::get_num_threads(), 2);  // the caller's count as it was
  {
    torch::AutoGradMode enabled(true);
    std::atomic<int> on{0};
    run_cpu_workers(2, 4, [&](int64_t) { on += torch::GradMode::is_enabled() ? 1 : 0; });
    EXPECT_EQ(on.load(), 4);  // the state of this call, not of an earlier one
  }
  at::set_num_threads(threads);
}

TEST(CpuWorkers, RethrowsATasksErrorAndStaysUsable) {
  EXPECT_THROW(run_cpu_workers(2, 10,
                               [](int64_t k) {
                                 if (k == 3) throw std::runtime_error("task 3 failed");
                               }),
               std::runtime_error);
  std::atomic<int64_t> sum{0};
  run_cpu_workers(2, 10, [&](int64_t k) { sum += k; });
  EXPECT_EQ(sum.load(), 45);
}

TEST(CpuWorkers, ACallFromInsideATaskRunsInThatTask) {
  std::atomic<int> inner{0};
  run_cpu_workers(2, 4, [&](int64_t) {
    const auto id = std::this_thread::get_id();
    run_cpu_workers(2, 3, [&](int64_t) {
      if (std::this_thread::get_id() == id) inner++;
    });
  });
  EXPECT_EQ(inner.load(), 12);
}

TEST(CpuWorkers, CallersOnSeveralThreadsTakeTurns) {
  std::atomic<int64_t> sum{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int call = 0; call < 20; ++call) run_cpu_workers(2, 5, [&](int64_t k) { sum += k; });
    });
  for (auto& t : callers) t.join();
  EXPECT_EQ(sum.load(), 4 * 20 * 10);
}

TEST(CpuWorkers, ParallelForCoversTheRangeOnSeveralThreads) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  std::vector<std::atomic<int>> seen(1000);
  std::mutex mu;
  std::vector<std::thread::id> ids;
  microdit::parallel_for(0, 1000, 100, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) seen[static_cast<size_t>(i)]++;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // long enough for the other thread to take a chunk
    std::lock_guard<std::mutex> lock(mu);
    ids.push_back(std::this_thread::get_id());
  });
  for (auto& s : seen) ASSERT_EQ(s.load(), 1);
  EXPECT_EQ(ids.size(), 2u);  // two chunks, one of them the caller's
  EXPECT_NE(ids[0], ids[1]);
  EXPECT_EQ(at::get_num_threads(), 2);
  // One chunk where the range is one grain, and inside a worker's task.
  int chunks = 0;
  microdit::parallel_for(0, 100, 100, [&](int64_t, int64_t) { ++chunks; });
  EXPECT_EQ(chunks, 1);
  std::atomic<int> inner{0};
  run_cpu_workers(2, 2, [&](int64_t) { microdit::parallel_for(0, 1000, 10, [&](int64_t, int64_t) { inner++; }); });
  EXPECT_EQ(inner.load(), 2);
  // An error in a chunk reaches the caller.
  EXPECT_THROW(microdit::parallel_for(0, 1000, 100,
                                      [](int64_t b, int64_t) {
                                        if (b > 0) throw std::runtime_error("chunk failed");
                                      }),
               std::runtime_error);
  at::set_num_threads(threads);
}

TEST(CpuWorkers, CallsFromTheCallersChunkOfParallelForRunInIt) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  std::atomic<int64_t> sum{0};
  microdit::parallel_for(0, 2, 1, [&](int64_t b, int64_t) {
    run_cpu_workers(2, 4, [&](int64_t k) { sum += k + b * 10; });  // would wait for the caller's own job
  });
  EXPECT_EQ(sum.load(), 6 + 6 + 40);
  at::set_num_threads(threads);
}
