// The training loop: EDM loss with deferred masking on precomputed shards, caption dropout,
// AdamW with warm-up + cosine/constant schedule, global-norm clipping, EMA, gradient
// accumulation, optional bf16 autocast, atomic checkpoints that resume bit-for-bit.
// Data parallel with a dist::Comm: each rank takes its part of every global batch, gradients are
// averaged by dist::GradSync (optionally with a sharded AdamW); rank 0 alone logs and writes.
#pragma once
#include <c10/core/Device.h>
#include <torch/optim/adamw.h>

#include <functional>
#include <memory>
#include <utility>

#include "data/latent_source.h"
#include "data/shards.h"
#include "io/safetensors.h"
#include "model/microdit.h"
#include "train/config.h"
#include "train/fused_adamw.h"

namespace microdit {

struct TrainState {
  int64_t step = 0;                 // optimizer steps done
  int64_t epoch = 0, position = 0;  // data position after the last consumed batch
};

// Learning rate at `step` (0-based): linear warm-up, then cosine to lr*min_lr_ratio or constant.
double learning_rate(const TrainConfig& c, int64_t step);

// Exponential moving average of the parameters (shadow copies, same names).
class Bf16Weights;

class EMA {
 public:
  EMA(torch::nn::Module& model, double decay, int64_t start);
  void update(torch::nn::Module& model, int64_t step);  // before `start`: copy
  // The same update for fused_adamw_step to make in its pass over the weights (on the CPU), for
  // the weights of the model the EMA was made from (the map is built once, with the EMA).
  const FusedEma& fused(int64_t step);
  NamedTensors tensors() const { return shadow_; }
  void load(const NamedTensors& t);
  // Temporarily swaps EMA weights into the model (for validation samples).
  void swap_into(torch::nn::Module& model);

 private:
  NamedTensors shadow_;
  FusedEma fused_;  // shadow_'s tensors by their weight's TensorImpl
  double decay_;
  int64_t start_;
};

// Checkpoint files: <out>/checkpoints/step-NNNNNNN.safetensors, written atomically.
std::string latest_checkpoint(const std::string& out_dir);  // "" when none
std::string final_checkpoint_path(const TrainConfig& cfg);    // the one written at train.steps
// The settings (flattened keys such as "edm.P_mean") under which the newest checkpoint in
// cfg.out was written and which differ from cfg's; empty when they agree or there is none.
std::vector<std::string> settings_changed_since_checkpoint(const TrainConfig& cfg);

namespace dist {
class Comm;
class GradSync;
}  // namespace dist

// The per-sample randomness of `n` samples of a step: sample g (its index in the step's global
// batch, first..first+n-1) draws from its own generator seeded by (seed, step, g), so the draws
// do not depend on how the batch is split across ranks and micro-batches.
struct SampleDraws {
  Tensor keep;        // (n) 1 keeps the caption, 0 drops it
  Tensor rnd_normal;  // (n, 1, 1, 1)
  Tensor noise;       // (n, C, H, W)
  Tensor mask_noise;  // (n, T) when masked
};
SampleDraws draw_samples(uint64_t seed, int64_t step, int64_t first, int64_t n,
                         c10::IntArrayRef sample_shape, int64_t tokens, bool masked,
                         double caption_dropout);

class Trainer {
 public:
  // comm: null trains in this process alone (the CLI passes one only for several ranks, or
  // with MICRODIT_FORCE_PG=1).
  Trainer(TrainConfig cfg, c10::Device device, dist::Comm* comm = nullptr);
  ~Trainer();
  // Continue from the newest checkpoint in cfg.out (returns false when there is none).
  bool resume();
  // Trains to train.steps, or stops early at `stop_at` (> 0) with a checkpoint there,
  // as an interrupted run would.
  void run(int64_t stop_at = 0);
  const TrainState& state() const { return state_; }
  int64_t caption_len() const { return caption_len_; }
  const std::string& encoder() const { return encoder_; }
  MicroDiTImpl& model() { return *model_; }  // the raw (not the EMA) weights
  // Called every run.sample_every steps (and at the end) with the model and EMA swapped in.
  std::function<void(MicroDiTImpl&, int64_t step)> on_sample;
  // Called at the end with the metrics file path.
  std::function<void(const std::string& metrics_path)> on_finish;

  double validation_loss();
  // With a sharded optimizer a collective: every rank calls it, rank 0 writes.
  void save_checkpoint();
  bool is_main() const { return rank_ == 0; }
  // One line on the data-parallel setup ("" for a single process).
  // "bf16 weight copies: N weights (M parameters) ..." when train.bf16_weights took them, else "".
  std::string precision_summary() const;
  std::string parallel_summary() const;

 private:
  Tensor train_step(const Batch& b);  // the mean loss, float64 () on the device
  // train.cuda_graph: the step recorded into a CUDA graph (one per masking phase) and replayed.
  // Returns this step's loss and gradient norm (before clipping; undefined without clipping),
  // copies on the device that later replays do not overwrite.
  struct StepGraph;
  std::unique_ptr<StepGraph> graph_;
  std::pair<Tensor, Tensor> graph_step(const Batch& b, double lr);
  void graph_body();  // what the graph records: reads the graph's input buffers only
  // The EDM loss of rows x with their captions, caption-keep flags and draws, all on the device
  // (mask_noise undefined: unmasked).
  Tensor sample_loss(const Tensor& x, const Tensor& captions, const Tensor& keep, const Tensor& rnd_normal,
                     const Tensor& noise, const Tensor& mask_noise);
  // Gradient clipping (train.grad_clip) and the AdamW step, with device scalars in a CUDA graph;
  // returns the gradient norm before clipping (undefined without clipping). With `ema` (the fused
  // optimizer on the CPU) the AdamW pass also makes the EMA's update for step `ema_step`.
  Tensor clip_and_step(AdamWDeviceScalars* dev, EMA* ema = nullptr, int64_t ema_step = 0);
  void log_metrics(const std::string& json_line);
  TrainConfig cfg_;
  c10::Device device_;
  MicroDiT model_{nullptr};
  std::vector<Tensor> params_;  // model_->parameters(), taken once (the same tensors all along)
  std::unique_ptr<torch::optim::AdamW> opt_;  // null with a sharded optimizer (in sync_)
  std::unique_ptr<Bf16Weights> copies_;       // bf16 weight copies (train.bf16_weights), or null
  dist::Comm* comm_ = nullptr;
  std::unique_ptr<dist::GradSync> sync_;
  int rank_ = 0, world_ = 1;
  int workers_ = 1;  // CPU batch slices run side by side (train.cpu_workers)
  std::unique_ptr<EMA> ema_;
  ShardSet train_, val_;  // train_ stays empty when it is streamed (data.stream_window > 0)
  ShardStream train_stream_;
  std::unique_ptr<LatentMDSSource> mds_;  // set when training on latent MDS folders
  double latent_scale_ = 0;               // > 0: a latent model (the VAE scaling factor)
  int latent_image_size_ = 0;
  void open_data();
  Tensor downsampled(const Tensor& images) const;
  std::string latent_json() const;
  TrainState state_;
  int64_t caption_len_ = 0;  // from the shards, saved so sampling encodes prompts alike
  std::string encoder_;
};

}  // namespace microdit
