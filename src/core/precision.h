// TF32 for float32 matrix products and convolutions on NVIDIA GPUs (Ampere and later): 10-bit
// mantissa inputs, float32 accumulation, several times the float32 rate. Off by default, as in
// PyTorch; the parity check always runs with it off. It only touches float32 work, so under
// bf16 autocast it speeds up what autocast keeps in float32. No effect on the CPU.
#pragma once
#include <string_view>

namespace microdit {

void set_tf32(bool on);  // process-wide (CUDA matmul and convolution precision)
bool tf32_enabled();     // what cuBLAS matmuls currently use

// Whether bf16 autocast pays on this device: on CUDA, and on CPUs whose cores multiply bf16
// (AVX-512 BF16 or AMX: Zen 4, Sapphire Rapids and later). Elsewhere oneDNN emulates bf16 and a
// training step ran 3x slower than in float32 (docs/performance.md): train.bf16: auto then
// trains in float32.
bool bf16_native(bool cuda);
// "bf16 autocast", with "(emulated: ...)" where bf16_native(cuda) is false, for the lines that
// say how a command runs.
const char* bf16_autocast_text(bool cuda);

// The --precision of the commands that sample (auto, bf16 or fp32): whether the network runs
// under bf16 autocast on a CUDA (cuda) or CPU device; auto is bf16_native(cuda), as train.bf16:
// auto. Anything else is a one-line error.
bool sampling_bf16(std::string_view precision, bool cuda);
// bf16_autocast_text(cuda) or "float32", for the lines that say how a command samples.
const char* sampling_precision_text(bool bf16, bool cuda);

}  // namespace microdit
