#include "eval/sampling.h"

#include <ATen/CPUGeneratorImpl.h>

namespace microdit {

Tensor generate_images(MicroDiTImpl& model, const Tensor& captions, uint64_t seed,
                       const EDMConfig& edm, const SamplerOptions& opt, int64_t batch,
                       const std::function<void(int64_t)>& progress) {
  const auto& c = model.config();
  const auto device = model.pos_embed.device();
  const int64_t N = captions.size(0);
  std::vector<Tensor> noise;
  for (int64_t i = 0; i < N; ++i) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + static_cast<uint64_t>(i));
    noise.push_back(at::randn({c.in_channels, c.input_size, c.input_size}, gen));
  }
  auto z = at::stack(noise);  // (N, C, H, W)
  std::vector<Tensor> out;
  for (int64_t s = 0; s < N; s += batch) {
    const int64_t n = std::min(batch, N - s);
    auto y = captions.narrow(0, s, n).to(device, at::kFloat).unsqueeze(1);  // (n, 1, L, W)
    out.push_back(edm_sample(model, z.narrow(0, s, n).to(device), y, edm, opt).to(at::kCPU));
    if (progress) progress(s + n);
  }
  return at::cat(out);
}

}  // namespace microdit
