// The server's image generator: a training checkpoint loaded once (EMA weights), as
// `microdit sample` does, making a few pictures at a time so the page can show them as they come.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "core/device.h"
#include "core/error.h"
#include "core/precision.h"
#include "eval/sampling.h"
#include "serve/server.h"
#include "text/encoder.h"
#include "vae/autoencoder_kl.h"

namespace microdit::serve {

namespace {

// A prompt as one shell word in single quotes.
std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

class CheckpointGenerator : public ImageGenerator {
 public:
  CheckpointGenerator(const std::string& ckpt, const std::string& vae_path, const std::string& device_name,
                      int scale, const std::string& precision)
      : ckpt_(ckpt), vae_path_(vae_path), precision_(precision), device_(resolve_device(device_name)),
        bf16_(sampling_bf16(precision, device_.is_cuda())) {
    sm_ = load_sampling_model(ckpt, device_, /*raw=*/false);
    const auto& cfg = sm_.model->config();
    MD_CHECK(!sm_.is_latent() || !vae_path.empty(),
             "{}: a latent model ({} channels) needs --vae W to make pictures{}", ckpt, cfg.in_channels,
             sm_.vae_hint.empty() ? "" : " (it was trained with " + sm_.vae_hint + ")");
    MD_CHECK(sm_.is_latent() || cfg.in_channels == 3,
             "{}: a {}-channel model without latent metadata cannot be turned into pictures", ckpt,
             cfg.in_channels);
    if (sm_.is_latent()) {
      vae_ = load_vae(vae_path, device_, device_.is_cuda() ? at::kBFloat16 : at::kFloat);
      MD_CHECK(vae_->config().latent_channels == cfg.in_channels, "{}: the VAE has {} latent channels, the model {}",
               vae_path, vae_->config().latent_channels, cfg.in_channels);
    }
    scale_ = scale > 0 ? scale : sm_.is_latent() ? 1 : 4;  // as `microdit sample`'s --scale
    encoder_ = text::make_text_encoder(sm_.text_encoder, {sm_.caption_len, c10::kCPU});
    MD_CHECK(encoder_->width() == cfg.caption_channels, "encoder '{}' gives {}-wide embeddings, the model takes {}",
             sm_.text_encoder, encoder_->width(), cfg.caption_channels);
    const int64_t side = cfg.input_size * (sm_.is_latent() ? 8 : 1);
    describe_ = fmt::format("{} ({}x{} {}, {} weights, text encoder {}, {}, {})", ckpt, side, side,
                            sm_.is_latent() ? "latent" : "pixels", sm_.ema ? "EMA" : "raw", sm_.text_encoder,
                            sampling_precision_text(bf16_, device_.is_cuda()), runtime_summary(device_));
  }

  std::string describe() const override { return describe_; }

  std::string sample_command(const GenerateRequest& r) const override {
    std::string cmd = fmt::format("microdit sample --ckpt {} ", shell_quote(ckpt_));
    if (!vae_path_.empty()) cmd += fmt::format("--vae {} ", shell_quote(vae_path_));
    cmd += fmt::format("--prompt {} --n {} --steps {} --cfg {} --seed {}", shell_quote(r.prompt), r.n, r.steps,
                       r.cfg, r.seed);
    if (scale_ != (sm_.is_latent() ? 1 : 4)) cmd += fmt::format(" --scale {}", scale_);
    if (precision_ != "auto") cmd += " --precision " + precision_;
    return cmd + " --out samples.png";
  }

  void generate(const GenerateRequest& r, const std::function<void(int64_t, const Image&)>& on_image,
                const std::function<bool()>& cancelled) override {
    torch::NoGradGuard ng;
    auto emb = encoder_->encode({r.prompt});  // (1, L, W)
    SamplerOptions so;
    so.steps = static_cast<int>(r.steps);
    so.cfg = r.cfg;
    so.bf16 = bf16_;
    // On the CPU, as many images at a time as there are threads: generate_images runs them side
    // by side, one per single-threaded worker (2.0x one at a time on 2 cores), each from its own
    // seed, so the pictures are those of one at a time. On a GPU all of them in one batch, as
    // `sample` does (a batch of one leaves most of a GPU idle); they arrive together.
    const bool cpu = device_.is_cpu();
    const int64_t group = cpu ? std::max(1, at::get_num_threads()) : r.n;
    for (int64_t i = 0; i < r.n; i += group) {
      if (cancelled()) return;
      const int64_t k = std::min(group, r.n - i);
      // Image i from seed + i alone: the same picture as `sample --seed S --n N`'s i-th.
      auto x = generate_images(*sm_.model, emb.expand({k, -1, -1}).contiguous(), r.seed + static_cast<uint64_t>(i),
                               sm_.edm, so, cpu ? 1 : k);  // (k, C, H, W)
      std::vector<Image> pictures;
      if (sm_.is_latent()) {
        auto px = vae_->decode(x.to(device_) / sm_.latent_scale).to(at::kCPU, at::kFloat);
        for (auto& picture : vae_output_to_images(px))
          pictures.push_back(scale_ > 1 ? resize(picture, picture.width * scale_, picture.height * scale_) : picture);
      } else {
        pictures = tensor_to_images(x, scale_);
      }
      for (int64_t j = 0; j < k; ++j) on_image(i + j, pictures.at(static_cast<size_t>(j)));
    }
  }

 private:
  std::string ckpt_, vae_path_, precision_, describe_;
  c10::Device device_;
  bool bf16_ = false;  // the network under bf16 autocast
  SamplingModel sm_;
  AutoencoderKL vae_{nullptr};
  std::unique_ptr<text::TextEncoder> encoder_;
  int scale_ = 1;
};

}  // namespace

std::unique_ptr<ImageGenerator> load_checkpoint_generator(const std::string& ckpt, const std::string& vae,
                                                          const std::string& device, int scale,
                                                          const std::string& precision) {
  return std::make_unique<CheckpointGenerator>(ckpt, vae, device, scale, precision);
}

}  // namespace microdit::serve
