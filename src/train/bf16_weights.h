// bf16 copies of the weights that bf16 autocast would cast in every training step.
//
// Under autocast each linear, convolution and expert matmul casts its float32 weight (and
// bias) to bf16 in the forward pass, and the backward pass casts each weight gradient back to
// float32: at MicroDiT_XL_2 that is about 700 small kernels and 7 GB of memory traffic per step
// (docs/performance.md). Here the forward pass multiplies bf16 copies that are leaves of the
// autograd graph, so their gradients stay bf16, and the AdamW step (train/fused_adamw.h) reads
// those gradients, updates the float32 weights and moments, and writes the copies for the next
// step in the same pass (kernels/adamw.h). The values are those of the plain path: the copy is
// the weight rounded as autocast rounds it, and a bf16 gradient converted to float32 is the
// float32 gradient autocast's cast gives. What changes is only where the rounding happens.
//
// The float32 weights stay the model's parameters (checkpoints, EMA, the optimizer state,
// sampling); the modules see the copies only inside a `Bound` scope around one training step's
// forward and backward pass. With gradient accumulation over several backward passes, or
// gradients reduced across processes, the copies' gradients would be rounded to bf16 between
// the passes or in the sums: there `sum_gradients_in_float32()` adds each copy's gradient to its
// weight's float32 .grad as soon as autograd has it (the float32 sum the plain path takes).
#pragma once
#include <torch/nn/module.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace microdit {

// auto: on for CUDA training steps that allow the copies (below), off on the CPU (where its
// 2-core measurement showed no gain, docs/performance.md); on: wherever allowed; off: never.
enum class Bf16WeightsMode { automatic, on, off };
Bf16WeightsMode parse_bf16_weights(const std::string& option, const std::string& name);

// Whether a training step takes the copies. They need bf16 autocast, the fused AdamW step on
// whole weights (not the sharded optimizer, whose slices are all-gathered into the float32
// weights after the step), and on CUDA the fused kernels (built with nvcc). `on` where one of
// these is missing fails with a one-line error naming it.
bool use_bf16_weights(Bf16WeightsMode mode, c10::Device device, bool bf16, bool fused_adamw, bool sharded,
                      const std::string& option);

class Bf16Weights {
 public:
  // The float32 weights and biases of model's Linear and Conv2d modules and the expert weights
  // of its mixture-of-experts layers, each with a bf16 copy on the same device.
  explicit Bf16Weights(torch::nn::Module& model);
  Bf16Weights(const Bf16Weights&) = delete;
  Bf16Weights& operator=(const Bf16Weights&) = delete;

  // Points the modules at the copies (copying the weights in first when they are stale) and
  // clears the copies' gradients; the destructor points them back at the float32 weights.
  class Bound {
   public:
    explicit Bound(Bf16Weights& w);
    ~Bound();
    Bound(const Bound&) = delete;
    Bound& operator=(const Bound&) = delete;

   private:
    Bf16Weights& w_;
  };
  [[nodiscard]] Bound bind() { return Bound(*this); }

  // The tensors a backward pass of a bound step differentiates in place of `params`: each
  // float32 weight with a copy is replaced by its copy.
  std::vector<at::Tensor> grad_targets(const std::vector<at::Tensor>& params) const;

  // The bf16 copy of a float32 weight, or nullptr when it has none.
  const at::Tensor* copy_of(const at::Tensor& weight) const;

  // From now on each copy's gradient, once a backward pass has accumulated it, is added to its
  // weight's float32 .grad (set to it when undefined) and the copy's .grad is cleared; then the
  // weight's own post-accumulate hook runs (the data-parallel buckets count it as ready). For
  // gradient accumulation and data parallelism: the sums stay float32, as on the plain path.
  void sum_gradients_in_float32();
  bool sums_in_float32() const { return float32_sums_; }

  // The float32 weights changed outside the optimizer (a checkpoint was loaded): the next
  // bind() copies them again.
  void invalidate() { fresh_ = false; }
  // The optimizer wrote every copy from its updated weight.
  void mark_fresh() { fresh_ = true; }

  size_t size() const { return entries_.size(); }
  int64_t numel() const;

 private:
  struct Entry {
    at::Tensor* member;  // the module's own handle (e.g. LinearImpl::weight)
    at::Tensor weight;   // float32, the registered parameter
    at::Tensor copy;     // bf16 leaf that requires grad
  };
  void refresh();
  std::vector<Entry> entries_;
  std::unordered_map<const c10::TensorImpl*, size_t> index_;
  bool fresh_ = false;
  bool bound_ = false;
  bool float32_sums_ = false;
};

}  // namespace microdit
