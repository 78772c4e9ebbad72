// Where a GPU spends its time: runs `work` under LibTorch's Kineto profiler and sums the
// device's kernel and memory-copy times by name. For `bench --profile`.
#pragma once
#include <c10/core/Device.h>

#include <functional>
#include <string>

namespace microdit {

// A text table: the `top` names with the most device time (total ms, share, count, mean us),
// then the device's busy time against the wall time of `work` (which must end synchronised).
std::string profile_device_kernels(c10::Device device, const std::function<void()>& work, int top = 30);

}  // namespace microdit
