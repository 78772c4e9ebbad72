// Training configuration: YAML file + key=value overrides (dotted paths), every key checked.
#pragma once
#include <array>
#include <string>
#include <vector>

#include "diffusion/edm.h"
#include "model/config.h"

namespace microdit {

struct TrainConfig {
  ModelConfig model;
  EDMConfig edm;
  // data
  std::string shards;                // folder written by `microdit prepare` (= shard_dirs[0])
  std::vector<std::string> shard_dirs;  // data.shards as a list: several latent MDS folders
                                     // (the reference's precomputed latents) read as one set
  int image_size = 0;                // latent MDS: column latents_<image_size>; 0: 8 x input_size
  std::vector<std::string> val_shards;  // latent MDS folders for the validation loss (optional)
  double latent_scale = 0;           // latent MDS: the VAE scaling factor; 0: from microdit.json,
                                     // else SDXL's 0.13025
  std::string train_split = "train", val_split = "val";
  double caption_dropout = 0.1;      // whole caption -> zeros, for classifier-free guidance
  int stream_window = 0;             // 0: hold the training split in memory; N: stream it from
                                     // disk N shards at a time (shuffled within each window)
  std::string text_encoder = "minilm";  // encodes sample prompts; must match the shards'
  int downsample = 1;                // pixel shards: average k x k pixel blocks first (a cheaper,
                                     // lower-resolution first stage from the same shards)
  // optimisation (paper: AdamW, betas .9/.999, eps 1e-8, wd 0.1)
  int64_t steps = 1000, batch_size = 64, grad_accum = 1;
  double mask_ratio = 0.75;
  int64_t unmasked_steps = 0;        // the last N steps train with no mask (unmasked fine-tuning)
  double lr = 2.4e-4, weight_decay = 0.1, eps = 1e-8;
  std::array<double, 2> betas{0.9, 0.999};
  int64_t warmup_steps = 0;
  std::string schedule = "cosine";   // cosine | constant
  double min_lr_ratio = 0.33;        // cosine decays to lr * min_lr_ratio
  double grad_clip = 0.25;           // global norm; 0 disables
  double ema_decay = 0.0;            // 0 disables EMA
  int64_t ema_start = 0;
  bool bf16 = false;                 // bf16 autocast
  // train.bf16: auto: bf16 where it pays (core/precision.h bf16_native), set by resolve_bf16 for
  // the run's device; until then bf16 is undecided.
  bool bf16_auto = false;
  bool fused_optimizer = true;       // AdamW as one fused kernel (train/fused_adamw.h)
  // bf16 weight copies kept by the AdamW step instead of autocast's casts (train/bf16_weights.h):
  // auto (on CUDA where allowed), on or off. Written to a checkpoint's settings unless auto.
  std::string bf16_weights = "auto";
  bool tf32 = false;                 // TF32 float32 matmuls on NVIDIA GPUs (core/precision.h)
  bool activation_checkpointing = false;  // recompute each block in backward (model/recompute.h)
  // Record the training step (forward, backward, clipping, AdamW) into a CUDA graph once per
  // masking phase and replay it (core/cuda_graph.h): one process on one GPU, the fused AdamW.
  bool cuda_graph = false;
  // LayerNorm in bf16 under autocast, as the reference trains (Composer's low_precision_layernorm;
  // model/layers.h). Written to a checkpoint's settings only when on.
  bool low_precision_layernorm = false;
  int cpu_workers = 0;               // CPU: batch slices side by side (train/parallel_backward.h); 0 auto
  uint64_t seed = 0;
  // data parallelism (several ranks; see docs/distributed.md)
  bool shard_optimizer = false;      // AdamW moments split across ranks (ZeRO-1)
  double bucket_mb = 25;             // gradient all-reduce bucket size
  // stage transitions
  std::string init_from;             // weights of an earlier stage (optimizer reset)
  std::string init_weights = "raw";  // from our own checkpoints: "raw" (model.*) or "ema" (ema.*)
  std::vector<std::string> init_allow_missing, init_allow_unexpected;
  // run
  std::string out = "runs/default";
  int64_t log_every = 10, checkpoint_every = 500, keep_last = 3;
  int64_t val_every = 500, val_batches = 4;
  std::vector<double> val_sigmas{0.2, 0.5, 1.0, 2.0};
  int64_t sample_every = 0;
  std::vector<std::string> sample_prompts;
  int sample_steps = 20;
  double sample_cfg = 3.0;
  uint64_t sample_seed = 0;
  std::string vae;                   // latent models: VAE weights that decode the sample grids

  void validate() const;
};

// Reads FILE, applies overrides "section.key=value" (value parsed as YAML), validates.
// Unknown keys and wrong types are errors naming the key.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides);
// Decides train.bf16: auto for a run on CUDA (cuda) or the CPU: bf16 where bf16_native says it
// pays, then checks what needs bf16. Returns "train.bf16: auto -> ..." (why) when it decided,
// else "". Idempotent; the trainer calls it, and so must whatever compares settings before.
std::string resolve_bf16(TrainConfig& c, bool cuda);
std::string train_config_to_yaml(const TrainConfig& c);
// The settings ("section.key") whose values differ between two train_config_to_yaml texts, or
// that only one of them has; for the warning when a run resumes under other settings.
std::vector<std::string> changed_settings(const std::string& before_yaml, const std::string& now_yaml);

}  // namespace microdit
