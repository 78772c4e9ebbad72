#include "train/parallel_backward.h"

#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <optional>

#include <ATen/Parallel.h>

#include "core/cpu_matmul.h"
#include "core/cpu_workers.h"
#include "core/error.h"

namespace microdit {

int resolve_cpu_workers(int requested, c10::Device device, bool distributed) {
  MD_CHECK(requested >= 0, "CPU workers must be >= 0 (0: one per thread), got {}", requested);
  if (!device.is_cpu()) return 1;
  if (requested == 0) return distributed ? 1 : at::get_num_threads();
  MD_CHECK(requested == 1 || !distributed,
           "{} CPU workers per rank cannot be combined with several ranks: start more ranks instead", requested);
  return requested;
}

at::Tensor parallel_backward(const std::vector<at::Tensor>& params, int64_t rows, int workers, double scale,
                         const std::function<at::Tensor(int64_t, int64_t)>& loss_of_rows,
                         const std::vector<at::Tensor>* sum_into) {
  MD_CHECK(!sum_into || sum_into->size() == params.size(), "parallel_backward: sum_into must match params");
  const int64_t parts = std::clamp<int64_t>(workers, 1, rows);
  if (parts == 1) {
    auto loss = loss_of_rows(0, rows);
    (loss * scale).backward();
    return loss.detach().to(at::kDouble);  // no host synchronisation: read when logged
  }
  // Slice k holds rows [first[k], first[k] + size[k]): sizes differ by at most one.
  std::vector<int64_t> first(parts), size(parts);
  for (int64_t k = 0, at_row = 0; k < parts; ++k) {
    size[k] = rows / parts + (k < rows % parts ? 1 : 0);
    first[k] = at_row;
    at_row += size[k];
  }
  std::vector<std::vector<at::Tensor>> grads(parts);
  std::vector<double> losses(parts);
  // The weights keep their values until the workers are done: their bf16 products on the CPU
  // pack each weight once for all of them (core/cpu_matmul.h).
  std::optional<PackedWeights> packed;
  if (!params.empty() && params.front().device().is_cpu()) packed.emplace(params);
  run_cpu_workers(static_cast<int>(parts), parts, [&](int64_t k) {
    auto loss = loss_of_rows(first[k], size[k]);  // mean over this slice's rows
    const double weight = scale * static_cast<double>(size[k]) / static_cast<double>(rows);
    grads[k] = torch::autograd::grad({loss * weight}, params, /*grad_outputs=*/{},
                                     /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    losses[k] = loss.item<double>() * static_cast<double>(size[k]);
  });
  // The slices' gradients summed on the same workers, a parameter per task (each sum in the
  // slices' order: the same bits on any number of workers).
  run_cpu_workers(static_cast<int>(parts), static_cast<int64_t>(params.size()), [&](int64_t t) {
    const auto i = static_cast<size_t>(t);
    at::NoGradGuard no_grad;
    const auto dt = sum_into ? (*sum_into)[i].scalar_type() : params[i].scalar_type();
    at::Tensor sum;
    bool own = false;  // sum is a tensor of this task's own, which later slices may add into
    for (int64_t k = 0; k < parts; ++k) {
      auto g = grads[k][i].defined() ? grads[k][i].to(dt) : at::Tensor();
      if (!g.defined()) continue;
      if (!sum.defined()) {
        // The first slice's gradient takes the sum in place when nothing else holds it and it is
        // dense (no expanded view); a new tensor's pages would be faulted in at every step.
        own = g.is_contiguous() && g.use_count() <= 2 && g.storage().use_count() == 1;
        sum = g;
      } else if (own) {
        sum.add_(g);
      } else {
        sum = sum + g;
        own = true;
      }
    }
    if (!sum.defined()) return;
    auto& p = const_cast<at::Tensor&>(sum_into ? (*sum_into)[i] : params[i]);
    if (p.mutable_grad().defined()) p.mutable_grad().add_(sum);
    else p.mutable_grad() = sum.contiguous();
  });
  double total = 0;
  for (double l : losses) total += l;
  return at::scalar_tensor(total / static_cast<double>(rows), at::kDouble);
}

}  // namespace microdit
