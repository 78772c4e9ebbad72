// Device and thread selection shared by every command (--device cpu|cuda|auto, --threads N).
#pragma once
#include <c10/core/Device.h>

#include <string>

namespace microdit {

// "auto" (CUDA when LibTorch sees a GPU, else CPU), "cpu", "cuda" or "cuda:N".
c10::Device resolve_device(const std::string& name);
// N > 0 sets LibTorch's intra-op threads; 0 keeps LibTorch's default (all cores).
void set_threads(int n);
// One line describing the runtime: LibTorch version, device, threads.
std::string runtime_summary(const c10::Device& device);

}  // namespace microdit
