// Counting the bytes of CPU tensors, as CUDA's caching allocator counts its own.
//
// The process's peak RSS (what the CPU rows printed before) also holds the program, LibTorch's
// libraries, malloc's free lists and the libraries' own buffers. The bytes of live tensors are
// the number to compare with a GPU's "allocated" figure: the same parameters, gradients,
// optimizer state and saved activations, so a CPU run of a small batch predicts a GPU's memory.
#pragma once
#include <cstdint>

namespace microdit {

// Installs a counting allocator in front of LibTorch's CPU allocator (once; later calls do
// nothing). Tensors allocated before it are not counted, and freeing them does not count either.
void track_cpu_allocations();
bool cpu_allocations_tracked();
// Bytes of CPU tensors alive now, and the most alive at once since tracking began or since
// reset_cpu_allocation_peak (0 when not tracked).
int64_t cpu_allocated_bytes();
int64_t cpu_peak_allocated_bytes();
void reset_cpu_allocation_peak();

}  // namespace microdit
