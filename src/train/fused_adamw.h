// One AdamW step for all parameters of a torch::optim::AdamW in a single fused kernel
// (ATen's _fused_adamw_, CPU and CUDA) instead of ~8 small operations per tensor. The
// moments live in the optimizer's own AdamWParamState, so checkpoints, resume and the plain
// `opt.step()` keep working and the two can be mixed. Same update as torch::optim::AdamW
// (decoupled weight decay, bias correction), up to float rounding (tests/test_fused_adamw.cpp).
#pragma once
#include <torch/optim/adamw.h>

namespace microdit {

// Parameters must be float32 on one device; amsgrad is not supported (never used here).
void fused_adamw_step(torch::optim::AdamW& opt);

}  // namespace microdit
