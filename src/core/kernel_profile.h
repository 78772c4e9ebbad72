// Where the time goes: runs `work` under LibTorch's Kineto profiler. On a GPU it sums the
// device's kernel and memory-copy times by name; on the CPU, each ATen operator's self time
// (less the operators it called). A second table charges the same times to call sites: the
// outermost operator on the thread (what the model code called, or an autograd node), the
// operator that ran or launched the kernel, and that operator's tensor inputs, as in
// "aten::to > aten::copy_ f32[16,64,8,32], bf16[16,64,8,32]". For `bench --profile`.
// With a json_path, every name and call site (not only the top rows) also goes to that file, in
// the format tools/bench_reference.py --profile-json writes for the reference, so that
// tools/compare_profiles.py can put the two programs' time side by side by kind of work.
#pragma once
#include <c10/core/Device.h>

#include <functional>
#include <string>

namespace microdit {

// Text tables of the `top` names and call sites with the most time (total ms, share, count,
// mean us), and the busy time against the wall time of `work` (which must end synchronised).
// `runs`: how many steps (or sampling runs) `work` does, written to the JSON file so that a
// reader can give times per step.
std::string profile_ops(c10::Device device, const std::function<void()>& work, int top = 30,
                        const std::string& json_path = "", int runs = 1);

}  // namespace microdit
