// The training loop: EDM loss with deferred masking on precomputed shards, caption dropout,
// AdamW with warm-up + cosine/constant schedule, global-norm clipping, EMA, gradient
// accumulation, optional bf16 autocast, atomic checkpoints that resume bit-for-bit.
#pragma once
#include <c10/core/Device.h>
#include <torch/optim/adamw.h>

#include <functional>
#include <memory>

#include "data/shards.h"
#include "io/safetensors.h"
#include "model/microdit.h"
#include "train/config.h"

namespace microdit {

struct TrainState {
  int64_t step = 0;                 // optimizer steps done
  int64_t epoch = 0, position = 0;  // data position after the last consumed batch
};

// Learning rate at `step` (0-based): linear warm-up, then cosine to lr*min_lr_ratio or constant.
double learning_rate(const TrainConfig& c, int64_t step);

// Exponential moving average of the parameters (shadow copies, same names).
class EMA {
 public:
  EMA(torch::nn::Module& model, double decay, int64_t start);
  void update(torch::nn::Module& model, int64_t step);  // before `start`: copy
  NamedTensors tensors() const { return shadow_; }
  void load(const NamedTensors& t);
  // Temporarily swaps EMA weights into the model (for validation samples).
  void swap_into(torch::nn::Module& model);

 private:
  NamedTensors shadow_;
  double decay_;
  int64_t start_;
};

// Checkpoint files: <out>/checkpoints/step-NNNNNNN.safetensors, written atomically.
std::string latest_checkpoint(const std::string& out_dir);  // "" when none
std::string final_checkpoint_path(const TrainConfig& cfg);    // the one written at train.steps

class Trainer {
 public:
  Trainer(TrainConfig cfg, c10::Device device);
  ~Trainer();
  // Continue from the newest checkpoint in cfg.out (returns false when there is none).
  bool resume();
  // Trains to train.steps, or stops early at `stop_at` (> 0) with a checkpoint there,
  // as an interrupted run would.
  void run(int64_t stop_at = 0);
  const TrainState& state() const { return state_; }
  int64_t caption_len() const { return caption_len_; }
  const std::string& encoder() const { return encoder_; }
  // Called every run.sample_every steps (and at the end) with the model and EMA swapped in.
  std::function<void(MicroDiTImpl&, int64_t step)> on_sample;
  // Called at the end with the metrics file path.
  std::function<void(const std::string& metrics_path)> on_finish;

  double validation_loss();
  void save_checkpoint();

 private:
  double train_step(const Batch& b);
  void log_metrics(const std::string& json_line);
  TrainConfig cfg_;
  c10::Device device_;
  MicroDiT model_{nullptr};
  std::unique_ptr<torch::optim::AdamW> opt_;
  std::unique_ptr<EMA> ema_;
  ShardSet train_, val_;  // train_ stays empty when it is streamed (data.stream_window > 0)
  ShardStream train_stream_;
  at::Generator gen_;  // all training randomness: dropout, sigma, noise, masks
  TrainState state_;
  int64_t caption_len_ = 0;  // from the shards, saved so sampling encodes prompts alike
  std::string encoder_;
};

}  // namespace microdit
