#include "core/cuda_graph.h"

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/error.h"

namespace microdit {

struct CudaGraphStep::Impl {
  c10::Device device;
  std::function<void()> step;
  int warmup = 0;
  int calls = 0;
  c10::cuda::CUDAStream side;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
};

CudaGraphStep::CudaGraphStep(c10::Device device, std::function<void()> step, int warmup) {
  MD_CHECK(device.is_cuda(), "CUDA graphs need a CUDA device, got {}", device.str());
  MD_CHECK(warmup >= 1, "a CUDA graph needs at least one eager warm-up step, got {}", warmup);
  const c10::cuda::CUDAGuard guard(device);
  impl_ = std::unique_ptr<Impl>(new Impl{device, std::move(step), warmup, 0,
                                         c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()),
                                         nullptr});
}

CudaGraphStep::~CudaGraphStep() = default;

bool CudaGraphStep::captured() const { return impl_->graph != nullptr; }

void CudaGraphStep::run() {
  auto& m = *impl_;
  const c10::cuda::CUDAGuard device_guard(m.device);
  auto current = c10::cuda::getCurrentCUDAStream(m.device.index());
  at::cuda::CUDAEvent inputs_ready;
  inputs_ready.record(current);
  inputs_ready.block(m.side);  // the side stream waits for the copies queued before this call
  {
    const c10::cuda::CUDAStreamGuard on_side(m.side);
    if (m.calls < m.warmup) {
      m.step();
    } else {
      if (!m.graph) {
        // The recording allocates from a pool of its own: hand the blocks that the eager
        // warm-up freed back to the driver first, or a large step needs its memory twice.
        at::cuda::getCurrentCUDAStream().synchronize();
        c10::cuda::CUDACachingAllocator::emptyCache();
        m.graph = std::make_unique<at::cuda::CUDAGraph>();
        m.graph->capture_begin();
        try {
          m.step();
        } catch (...) {
          try {
            m.graph->capture_end();
          } catch (...) {
          }
          m.graph.reset();
          throw;
        }
        m.graph->capture_end();  // recording runs nothing: the replay below is this call's step
      }
      m.graph->replay();
    }
  }
  at::cuda::CUDAEvent step_done;
  step_done.record(m.side);
  step_done.block(current);
  ++m.calls;
}

}  // namespace microdit
