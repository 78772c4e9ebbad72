// Data parallelism inside one process, for the CPU: a batch's rows are cut into slices whose
// forward and backward passes run side by side on single-threaded workers
// (core/cpu_workers.h), and their gradients are summed. On 2 cores this trains Nano 1.2-1.3x
// faster than one pass on 2 intra-op threads, with no second process and no all-reduce
// (docs/performance.md).
//
// Each slice's gradients come from torch::autograd::grad into their own tensors, so the
// workers never write the same .grad; the sum is taken in slice order, so a step is
// deterministic for a given number of workers. Up to float rounding it equals one pass over
// the whole batch (tests/test_parallel_backward.cpp). Every operation in MicroDiT is per
// sample (expert-choice routing picks tokens within each image), so the split changes
// nothing else.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <vector>

namespace microdit {

// The worker count for a setting: 0 (auto) is one per intra-op thread on the CPU and 1 on a
// GPU or with several ranks (each rank is a worker already); N > 0 is N on the CPU. Fails on
// N > 1 with several ranks: their gradient all-reduce hooks need one ordinary backward.
int resolve_cpu_workers(int requested, c10::Device device, bool distributed);

// loss_of_rows(first, n): the mean loss over rows [first, first + n) of the batch, built on
// the calling worker. Adds scale * d(mean loss over all `rows`)/d(param) to each parameter's
// .grad (defining it where undefined), and returns the batch's mean loss: a detached float64
// scalar on the loss's device, so that a GPU step does not wait for it (read it when logged).
// workers <= 1 is one ordinary backward over the whole batch.
// With `sum_into` (as long as params), the slices' gradients with respect to params[i] are
// summed in the dtype of sum_into[i] and added to its .grad instead: the bf16 weight copies
// (train/bf16_weights.h) are differentiated, their float32 weights receive the float32 sum,
// as the plain path sums the float32 gradients autocast's casts give.
at::Tensor parallel_backward(const std::vector<at::Tensor>& params, int64_t rows, int workers, double scale,
                         const std::function<at::Tensor(int64_t first, int64_t n)>& loss_of_rows,
                         const std::vector<at::Tensor>* sum_into = nullptr);

}  // namespace microdit
