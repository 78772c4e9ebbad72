// Generating images from caption embeddings with a trained model, and laying them out.
#pragma once
#include "diffusion/edm.h"

namespace microdit {

// One image per caption row. Image i starts from unit noise drawn with seed + i, so a
// result depends on the seed and its index only, never on the batch it was made in.
// captions (N, L, W) float32 -> images (N, C, H, W) float32 on the CPU.
Tensor generate_images(MicroDiTImpl& model, const Tensor& captions, uint64_t seed,
                       const EDMConfig& edm, const SamplerOptions& opt, int64_t batch = 16,
                       const std::function<void(int64_t done)>& progress = nullptr);

// How generate_images cuts N images into chunks of at most `batch` for `threads` CPU workers
// side by side: a multiple of `threads` chunks whose sizes differ by at most one, so that no
// worker has a chunk left when the others are done (48 in batches of 16 on 2 threads: 4 chunks
// of 12, not 16 + 16 on one worker and 16 on the other). One thread: chunks of `batch`.
struct SamplingChunks {
  int64_t size, count;
};
SamplingChunks sampling_chunks(int64_t n, int64_t batch, int threads);

// A training checkpoint made ready for sampling: the model (EMA weights unless `raw`), and
// what encoding prompts needs (the text encoder's name and the caption length).
struct SamplingModel {
  MicroDiT model{nullptr};
  EDMConfig edm;
  int64_t caption_len = 0;
  std::string text_encoder;
  bool ema = false;
  // The space the model works in: pixels (latent_scale 0), or a VAE's latents multiplied by
  // latent_scale (the checkpoint's `latent` metadata; checkpoints without it are pixel models).
  double latent_scale = 0;
  std::string vae_hint;  // the VAE the run named (informational)
  bool is_latent() const { return latent_scale > 0; }
};
SamplingModel load_sampling_model(const std::string& ckpt, c10::Device device, bool raw = false);

}  // namespace microdit
