// Gradient synchronisation for data parallelism: our own bucket engine on post-accumulate-grad
// hooks (docs/distributed.md). All parameters live in one flat buffer in reverse registration
// order (about the order gradients become ready) and their .grad tensors are views of a second
// flat buffer, so autograd accumulates in place. The buffers are cut into buckets (the first
// one small, so communication starts early); a bucket is launched once all its gradients are
// in, strictly in bucket order so every rank issues the same collective sequence.
//   replicated: all-reduce each bucket, divide by the world size; the caller's optimizer
//               (torch::optim::AdamW on the model's parameters) runs on every rank.
//   sharded:    (train.shard_optimizer, ZeRO-1) reduce-scatter each bucket, so rank r holds the
//               averaged gradient of slice r of every bucket; AdamW (torch::optim::AdamW, the
//               same math) updates that slice only; all-gather the parameters after the step.
#pragma once
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dist/dist.h"

namespace microdit::dist {

struct GradSyncOptions {
  int64_t bucket_bytes = 25 << 20;      // DDP's default bucket size
  int64_t first_bucket_bytes = 1 << 20;  // the first bucket (last layers) launches early
  bool shard = false;
  torch::optim::AdamWOptions adamw{1e-3};  // sharded: the optimizer of the own slices
};

class GradSync {
 public:
  // Lays out `model`'s trainable parameters in the flat buffers (their values are kept).
  GradSync(torch::nn::Module& model, Comm& comm, GradSyncOptions o);
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  void broadcast_params(int root = 0);  // rank 0's weights to everyone
  void zero_grad();                     // keeps the .grad views
  // Before each micro-batch's backward: `sync` is true on the last one only (accumulation
  // communicates once per step).
  void begin_backward(bool sync);
  // After the synced backward: launches the buckets not yet launched (gradients that never
  // came are zeros), waits, averages. Replicated: every .grad holds the global mean gradient.
  void finish();
  // Sharded only: the global gradient norm before clipping; clip_coef scales the slices.
  double sharded_grad_norm();
  void sharded_clip(double max_norm, double total_norm);
  // Sharded only: AdamW on the own slices at `lr`, then all-gather the parameters.
  void sharded_step(double lr);
  // Sharded only: bytes of AdamW moments this rank holds (and would hold unsharded).
  int64_t moment_bytes() const;
  int64_t unsharded_moment_bytes() const;
  int64_t adam_step() const;
  // Sharded only, a collective: every parameter's full exp_avg/exp_avg_sq (by parameter name),
  // empty before the first step.
  std::map<std::string, std::pair<Tensor, Tensor>> gather_moments();
  // Sharded only: full per-parameter moments (any world size wrote them) -> own slices.
  void load_moments(const std::map<std::string, std::pair<Tensor, Tensor>>& moments, int64_t step);
  // Sharded only: the model's parameters were overwritten (checkpoint): refresh the own slices.
  void params_changed();
  size_t buckets() const { return buckets_.size(); }
  // Test only (MICRODIT_TEST_NO_AVERAGE): skip the division by the world size.
  bool skip_average = false;

  void on_grad_ready(size_t bucket);  // called by the hooks

 private:
  struct Param {
    std::string name;
    Tensor tensor;
    int64_t offset, numel;
    size_t bucket;
  };
  struct Bucket {
    int64_t offset = 0, size = 0;  // in the flat buffers; size padded to a multiple of world
    int params = 0, pending = 0;
    Tensor grads, values;            // views of flat_g_ / flat_p_
    Tensor own_grad, own_param;      // sharded: slice rank of the bucket (world-th of size)
  };
  void launch(size_t b);
  Comm& comm_;
  GradSyncOptions o_;
  std::vector<Param> params_;
  std::vector<Bucket> buckets_;
  Tensor flat_p_, flat_g_;
  std::vector<Work> works_;
  size_t next_ = 0;
  bool sync_ = false;
  std::unique_ptr<torch::optim::AdamW> opt_;  // sharded: over the own_param slices
};

}  // namespace microdit::dist
