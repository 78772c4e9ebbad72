// torch::nn::Linear whose float32 CPU products go to oneDNN (core/cpu_matmul.h). Same
// parameters, names and initial values; code elsewhere may still view it as
// torch::nn::LinearImpl (it derives from it). Every linear layer of the program is one.
#pragma once
#include <torch/nn/modules/linear.h>

#include "core/cpu_matmul.h"

namespace microdit {

struct LinearImpl : torch::nn::LinearImpl {
  using torch::nn::LinearImpl::LinearImpl;
  at::Tensor forward(const at::Tensor& x) { return microdit::linear(x, weight, bias); }
};
TORCH_MODULE(Linear);

}  // namespace microdit
