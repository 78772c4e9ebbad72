#include "core/precision.h"

#include <ATen/Context.h>

#include "core/choice.h"

namespace microdit {

void set_tf32(bool on) {
  const auto p = on ? at::Float32Precision::TF32 : at::Float32Precision::IEEE;
  at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, p);
  at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, p);
}

bool bf16_native(bool cuda) {
  if (cuda) return true;
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") != 0 || __builtin_cpu_supports("amx-bf16") != 0;
#else
  return false;
#endif
}

const char* bf16_autocast_text(bool cuda) {
  return bf16_native(cuda) ? "bf16 autocast" : "bf16 autocast (emulated: this CPU has no AVX-512 BF16 or AMX)";
}

bool sampling_bf16(std::string_view precision, bool cuda) {
  enum { automatic, bf16, fp32 };
  switch (parse_choice<int>("--precision", precision, {{"auto", automatic}, {"bf16", bf16}, {"fp32", fp32}})) {
    case automatic: return bf16_native(cuda);
    case bf16: return true;
    default: return false;
  }
}

const char* sampling_precision_text(bool bf16, bool cuda) { return bf16 ? bf16_autocast_text(cuda) : "float32"; }

bool tf32_enabled() {
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
}

}  // namespace microdit
