// A training step recorded once into a CUDA graph and replayed: one launch per step instead
// of thousands of kernel launches, each with its host-side dispatch. MicroDiT's step suits
// it: its shapes are static (the kept tokens and each expert's capacity are fixed), and it
// reads nothing back to the host (the loss stays on the device, gradients are clipped by a
// device-side coefficient, AdamW takes its step count and learning rate from device tensors).
//
// The step must read its inputs from tensors that stay put (copy each new batch and its
// noise into them before `run`), and write what the caller reads into tensors that stay put.
// A replay re-runs the recorded kernels, not the host code: host-side counters in the
// step do not advance on replays.
#pragma once
#include <c10/core/Device.h>

#include <functional>
#include <memory>

namespace microdit {

class CudaGraphStep {
 public:
  // `warmup` eager calls first (on a side stream, so that cuBLAS workspaces, autocast and
  // the allocator settle), then one call records the step and replays it.
  CudaGraphStep(c10::Device device, std::function<void()> step, int warmup = 2);
  ~CudaGraphStep();
  CudaGraphStep(const CudaGraphStep&) = delete;
  CudaGraphStep& operator=(const CudaGraphStep&) = delete;

  // One step: eager during the warm-up, then the graph. Ordered after the work queued on
  // the current stream (the copies of the inputs), and the current stream waits for it.
  void run();
  bool captured() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace microdit
