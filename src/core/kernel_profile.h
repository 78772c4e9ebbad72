// Where the time goes: runs `work` under LibTorch's Kineto profiler. On a GPU it sums the
// device's kernel and memory-copy times by name; on the CPU, each ATen operator's self time
// (less the operators it called). For `bench --profile`.
#pragma once
#include <c10/core/Device.h>

#include <functional>
#include <string>

namespace microdit {

// A text table: the `top` names with the most time (total ms, share, count, mean us), then
// the busy time against the wall time of `work` (which must end synchronised).
std::string profile_ops(c10::Device device, const std::function<void()>& work, int top = 30);

}  // namespace microdit
