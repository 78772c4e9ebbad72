// kernels/fused.h for a build without nvcc: available() is false and model/fused.cpp never
// calls the rest (it takes LibTorch's operators instead).
#include "kernels/adamw.h"
#include "kernels/fused.h"

#if !MICRODIT_HAVE_CUDA_KERNELS
#include <stdexcept>

namespace microdit::kernels {

bool available() { return false; }
void set_warp_row_kernels(bool) {}
bool warp_row_kernels() { return false; }
int64_t warp_row_launches() { return 0; }

[[noreturn]] static void missing() {
  throw std::runtime_error("this microdit was built without nvcc: no fused CUDA kernels");
}

void modln_forward(const void*, int64_t, DType, void*, DType, const float*, const void*,
                   const void*, void*, DType, float*, float*, int64_t, int64_t, int64_t, float,
                   void*) { missing(); }
void modln_backward_dx(const void*, DType, const void*, int64_t, DType, const float*, const void*,
                       const float*, const float*, void*, int64_t, DType, const void*, int64_t, int64_t, int64_t,
                       void*) {
  missing();
}
void modln_backward_sums(const void*, DType, const void*, int64_t, DType, const float*,
                         const float*, float*, float*, int64_t, int64_t, int64_t, void*) {
  missing();
}
void gated_residual_forward(const void*, DType, const void*, DType, const void*, DType, void*,
                            int64_t, int64_t, int64_t, void*) { missing(); }
void gated_residual_backward(const void*, DType, const void*, DType, const void*, DType, void*,
                             float*, int64_t, int64_t, int64_t, void*) { missing(); }
void swiglu_forward(const void*, const void*, void*, DType, int64_t, void*) { missing(); }
void swiglu_backward(const void*, const void*, const void*, void*, void*, DType, int64_t, void*) {
  missing();
}
void moe_scatter_sum(const void*, DType, const float*, const int32_t*, void*, DType, int64_t, int64_t, int64_t,
                     int64_t, int64_t, void*) {
  missing();
}
void adamw_step(const AdamWSlot*, int64_t, DType, DType, const AdamWHyper&, void*) { missing(); }

}  // namespace microdit::kernels
#endif
