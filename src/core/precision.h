// TF32 for float32 matrix products and convolutions on NVIDIA GPUs (Ampere and later): 10-bit
// mantissa inputs, float32 accumulation, several times the float32 rate. Off by default, as in
// PyTorch; the parity check always runs with it off. It only touches float32 work, so under
// bf16 autocast it speeds up what autocast keeps in float32. No effect on the CPU.
#pragma once

namespace microdit {

void set_tf32(bool on);  // process-wide (CUDA matmul and convolution precision)
bool tf32_enabled();     // what cuBLAS matmuls currently use

}  // namespace microdit
