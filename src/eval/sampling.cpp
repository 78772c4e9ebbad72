#include "eval/sampling.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "core/autocast.h"
#include "core/cpu_workers.h"
#include "core/error.h"
#include "io/checkpoint.h"

namespace microdit {

SamplingChunks sampling_chunks(int64_t n, int64_t batch, int threads) {
  int64_t size = batch;
  if (threads > 1) {
    const int64_t rounds = ((n + batch - 1) / batch + threads - 1) / threads;  // chunks per thread
    size = (n + rounds * threads - 1) / (rounds * threads);
  }
  return {size, (n + size - 1) / size};
}

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
  // On the CPU, chunks run side by side on single-threaded workers, one per intra-op thread:
  // the small kernels of a sampling step scale poorly across threads, whole chunks do.
  const int threads = device.is_cpu() ? at::get_num_threads() : 1;
  const auto [chunk, chunks] = sampling_chunks(N, batch, threads);
  std::vector<Tensor> out(chunks);
  std::mutex mu;
  int64_t done = 0;
  auto run_chunk = [&](int64_t k) {
    const int64_t s = k * chunk, n = std::min(chunk, N - s);
    auto y = captions.narrow(0, s, n).to(device, at::kFloat).unsqueeze(1);  // (n, 1, L, W)
    out[k] = edm_sample(model, z.narrow(0, s, n).to(device), y, edm, opt).to(at::kCPU);
    std::lock_guard<std::mutex> lock(mu);
    done += n;
    if (progress) progress(done);
  };
  {
    // opt.bf16 turns bf16 autocast on; otherwise the caller's autocast state holds. The
    // workers take the caller's thread-local state.
    std::optional<AutocastGuard> autocast;
    if (opt.bf16) autocast.emplace(device.type(), true);
    run_cpu_workers(threads, chunks, run_chunk);
  }
  return at::cat(out);
}

SamplingModel load_sampling_model(const std::string& ckpt, c10::Device device, bool raw) {
  auto f = read_safetensors(ckpt);
  auto meta = [&](const std::string& key) {
    auto it = f.metadata.find(key);
    MD_CHECK(it != f.metadata.end(), "{}: not a microdit training checkpoint (no '{}')", ckpt, key);
    return it->second;
  };
  SamplingModel s;
  ModelConfig cfg;
  try {
    cfg = config_from_yaml(YAML::Load(meta("microdit_config")));
    s.caption_len = std::stoll(meta("caption_len"));
    s.edm.sigma_data = std::stod(meta("sigma_data"));
  } catch (const YAML::Exception&) {
    fail("{}: corrupt model configuration in the checkpoint", ckpt);
  } catch (const std::logic_error&) {  // stoll / stod
    fail("{}: corrupt metadata in the checkpoint", ckpt);
  }
  s.text_encoder = meta("text_encoder");
  if (auto it = f.metadata.find("latent"); it != f.metadata.end()) {
    auto j = nlohmann::json::parse(it->second, nullptr, false);
    MD_CHECK(!j.is_discarded() && j.is_object() && j.contains("space"),
             "{}: corrupt 'latent' metadata in the checkpoint", ckpt);
    if (j["space"] == "vae") {
      MD_CHECK(j.contains("scaling_factor") && j["scaling_factor"].is_number() &&
                   j["scaling_factor"].get<double>() > 0,
               "{}: the checkpoint's latent space has no valid scaling_factor", ckpt);
      s.latent_scale = j["scaling_factor"].get<double>();
      s.vae_hint = j.value("vae", std::string());
    }
  }
  bool has_ema = false;
  for (const auto& [k, t] : f.tensors) has_ema |= k.rfind("ema.", 0) == 0;
  s.ema = has_ema && !raw;
  const std::string prefix = s.ema ? "ema." : "model.";
  NamedTensors weights;
  for (const auto& [k, t] : f.tensors)
    if (k.rfind(prefix, 0) == 0) weights.emplace_back(k.substr(prefix.size()), t);
  s.model = MicroDiT(cfg);
  LoadOptions lo;
  if (s.ema) lo.allow_missing = {"pos_embed", "mask_token"};  // buffers are saved under model.*
  load_state_dict(*s.model, weights, lo, ckpt);
  s.model->to(device);
  s.model->eval();
  return s;
}

}  // namespace microdit
