#include "eval/parity.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "diffusion/edm.h"
#include "io/checkpoint.h"
#include "model/microdit.h"

namespace microdit {

// Tolerances of shared/reference/README.md.
constexpr double kForwardTol = 2e-5, kSamplerTol = 1e-4, kGradsTol = 1e-4, kGradTol = 1e-3;

bool ParityReport::ok() const {
  for (const auto& r : rows)
    if (!r.pass()) return false;
  return true;
}

double relative_error(const at::Tensor& ours, const at::Tensor& ref) {
  auto a = ours.detach().to(at::kCPU, at::kDouble).reshape(-1);
  auto b = ref.detach().to(at::kCPU, at::kDouble).reshape(-1);
  MD_CHECK(a.numel() == b.numel(), "shape mismatch: {} values vs {} in the reference", a.numel(),
           b.numel());
  const double diff = (a - b).norm().item<double>(), norm = b.norm().item<double>();
  return norm > 0 ? diff / norm : diff;
}

namespace {

nlohmann::json meta_value(const std::map<std::string, std::string>& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end()) return nullptr;
  try {
    return nlohmann::json::parse(it->second);
  } catch (const std::exception&) {
    return it->second;  // a bare string
  }
}

template <class T>
void read_meta(const std::map<std::string, std::string>& m, const std::string& key, T& out) {
  auto v = meta_value(m, key);
  if (v.is_null()) return;
  try {
    out = v.get<T>();
  } catch (const std::exception&) {
    fail("metadata '{}' = {} has the wrong type", key, m.at(key));
  }
}

}  // namespace

ModelConfig config_from_parity_metadata(const std::map<std::string, std::string>& m) {
  ModelConfig c;  // start from the reference DiT constructor's defaults
  c.input_size = 32, c.patch_size = 2, c.in_channels = 4, c.dim = 1152, c.depth = 28;
  c.head_dim = 64, c.multiple_of = 256, c.caption_channels = 1024, c.pos_interp_scale = 1.0;
  c.norm_eps = 1e-6, c.qkv_ratio = {1.0, 1.0}, c.mlp_ratio = {4.0, 4.0};
  c.patch_mixer_depth = 4, c.patch_mixer_dim = 512, c.patch_mixer_qkv_ratio = 1.0;
  c.patch_mixer_mlp_ratio = 1.0, c.use_bias = true, c.num_experts = 8, c.expert_capacity = 1.0;
  c.experts_every_n = 2;
  read_meta(m, "input_size", c.input_size);
  read_meta(m, "patch_size", c.patch_size);
  read_meta(m, "in_channels", c.in_channels);
  read_meta(m, "dim", c.dim);
  read_meta(m, "depth", c.depth);
  read_meta(m, "head_dim", c.head_dim);
  read_meta(m, "multiple_of", c.multiple_of);
  read_meta(m, "caption_channels", c.caption_channels);
  read_meta(m, "pos_interp_scale", c.pos_interp_scale);
  read_meta(m, "norm_eps", c.norm_eps);
  for (auto [key, field] : {std::pair{"qkv_ratio", &c.qkv_ratio}, std::pair{"mlp_ratio", &c.mlp_ratio}}) {
    auto v = meta_value(m, key);
    if (v.is_null()) continue;
    if (v.is_number()) {
      *field = {v.get<double>(), v.get<double>()};
    } else {
      MD_CHECK(v.is_array() && v.size() == 2, "metadata '{}' must be [lo, hi]", key);
      *field = {v[0].get<double>(), v[1].get<double>()};
    }
  }
  read_meta(m, "patch_mixer_depth", c.patch_mixer_depth);
  read_meta(m, "patch_mixer_dim", c.patch_mixer_dim);
  read_meta(m, "patch_mixer_qkv_ratio", c.patch_mixer_qkv_ratio);
  read_meta(m, "patch_mixer_mlp_ratio", c.patch_mixer_mlp_ratio);
  read_meta(m, "use_bias", c.use_bias);
  read_meta(m, "num_experts", c.num_experts);
  read_meta(m, "expert_capacity", c.expert_capacity);
  read_meta(m, "experts_every_n", c.experts_every_n);
  c.validate();
  return c;
}

ParityReport run_parity(const std::string& path, const c10::Device& device, bool cuda_graph) {
  auto file = read_safetensors(path);
  ParityReport rep;
  rep.metadata = file.metadata;
  rep.config = config_from_parity_metadata(file.metadata);
  const auto& cfg = rep.config;
  double mask_ratio = 0, cfg_scale = 1, p_mean = -0.6, p_std = 1.2, sigma_data = 0.9;
  int sample_steps = 0;
  read_meta(file.metadata, "mask_ratio", mask_ratio);
  read_meta(file.metadata, "cfg_scale", cfg_scale);
  read_meta(file.metadata, "sample_steps", sample_steps);
  read_meta(file.metadata, "p_mean", p_mean);
  read_meta(file.metadata, "p_std", p_std);
  read_meta(file.metadata, "sigma_data", sigma_data);
  EDMConfig edm;
  edm.P_mean = p_mean, edm.P_std = p_std, edm.sigma_data = sigma_data;

  // Full float32 everywhere: no TF32 shortcuts on GPUs.
  at::globalContext().setAllowTF32CuBLAS(false);
  at::globalContext().setAllowTF32CuDNN(false);

  MicroDiT model(cfg);
  NamedTensors weights;
  for (const auto& [k, t] : file.tensors)
    if (k.rfind("model.", 0) == 0) weights.emplace_back(k.substr(6), t);
  load_state_dict(*model, weights, {}, path);
  model->to(device);
  model->train();

  auto in = [&](const std::string& k) { return file.at(k).to(device); };
  auto has = [&](const std::string& k) { return file.find(k) != nullptr; };
  std::map<std::string, at::Tensor> ours;  // out.* and in.* we recompute

  const at::Tensor x = in("in.x"), t = in("in.t"), y = in("in.y");
  std::optional<TokenMask> mask;
  if (has("in.mask_noise") && mask_ratio > 0) {
    mask = mask_from_noise(in("in.mask_noise"), cfg.kept_tokens(mask_ratio));
    ours["in.ids_keep"] = mask->ids_keep;
    ours["in.ids_restore"] = mask->ids_restore;
    ours["out.mask"] = mask->mask;
  }
  {
    torch::NoGradGuard ng;
    if (has("out.sample_nomask")) ours["out.sample_nomask"] = model->forward(x, t, y);
    if (has("out.sample_cfg"))
      ours["out.sample_cfg"] = cfg_scale != 1.0 ? model->forward_cfg(x, t, y, cfg_scale)
                                                : model->forward(x, t, y);
    if (has("out.sample_masked") && mask) ours["out.sample_masked"] = model->forward(x, t, y, &*mask);
    if (has("out.t_freq")) ours["out.t_freq"] = timestep_features(t);
    if (has("out.pos_embed"))
      ours["out.pos_embed"] =
          sincos_pos_embed_2d(cfg.dim, cfg.grid(), cfg.grid(), cfg.pos_interp_scale).unsqueeze(0);
    if (has("out.pos_embed_2x_interp2"))  // the model built at twice the latent size, scale 2
      ours["out.pos_embed_2x_interp2"] =
          sincos_pos_embed_2d(cfg.dim, 2 * cfg.grid(), cfg.grid(), 2.0);
    if (has("out.denoised") && has("in.sigma"))
      ours["out.denoised"] = edm_denoise(*model, x, in("in.sigma"), y, edm);
    if (has("out.sampler_final") && has("in.sampler_init")) {
      SamplerOptions so;
      so.steps = sample_steps, so.cfg = cfg_scale;
      so.cuda_graph = cuda_graph;
      ours["out.sampler_final"] = edm_sample(*model, in("in.sampler_init"), y, edm, so);
    }
  }
  if (has("in.edm_rnd_normal") && has("in.edm_noise")) {
    LossDraws draws{in("in.edm_rnd_normal"), in("in.edm_noise"), std::nullopt};
    if (has("out.edm_loss_nomask")) {
      torch::NoGradGuard ng;
      ours["out.edm_loss_nomask"] = edm_loss(*model, x, y, draws, edm);
    }
    if (has("out.edm_loss_masked") && mask) {
      draws.mask = mask;
      model->zero_grad();
      auto loss = edm_loss(*model, x, y, draws, edm);
      loss.backward();
      ours["out.edm_loss_masked"] = loss.detach();
      // A parameter the loss does not reach (an MoE layer whose experts pick no token) has
      // a zero gradient.
      for (const auto& p : model->named_parameters())
        ours["grad." + p.key()] =
            p.value().grad().defined() ? p.value().grad() : torch::zeros_like(p.value());
    }
  }

  // Rows: every in.* we recompute, every out.*, every grad.*, then all gradients together.
  std::vector<at::Tensor> grads_ours, grads_ref;
  for (const auto& [key, ref] : file.tensors) {
    const bool is_out = key.rfind("out.", 0) == 0, is_grad = key.rfind("grad.", 0) == 0;
    if (!is_out && !is_grad && !ours.count(key)) continue;
    ParityRow row{key, 0, kForwardTol, true};
    if (key == "out.sampler_final") row.tolerance = kSamplerTol;
    if (is_grad) row.tolerance = kGradTol;
    auto it = ours.find(key);
    if (it == ours.end()) {
      // A gradient the reference has but we don't is a wrong graph; other outputs may be
      // ones this tool doesn't know.
      row.checked = is_grad;
      row.error = is_grad ? INFINITY : 0;
    } else if (!ref.is_floating_point()) {
      row.tolerance = 0;  // index tensors must match exactly
      row.error = it->second.sizes() == ref.sizes()
                      ? it->second.to(at::kCPU).ne(ref).sum().item<double>()
                      : INFINITY;
    } else {
      row.error = relative_error(it->second, ref);
      if (is_grad) {
        grads_ours.push_back(it->second.detach().to(at::kCPU, at::kDouble).reshape(-1));
        grads_ref.push_back(ref.to(at::kDouble).reshape(-1));
      }
    }
    rep.rows.push_back(row);
  }
  if (!grads_ref.empty())
    rep.rows.push_back({"grad.* (all together)",
                        relative_error(at::cat(grads_ours), at::cat(grads_ref)), kGradsTol, true});
  return rep;
}

}  // namespace microdit
