#include "train/config.h"

#include <yaml-cpp/yaml.h>

#include <functional>
#include <map>

#include "core/error.h"
#include "core/fs.h"
#include "core/precision.h"

namespace microdit {

namespace {

using Setter = std::function<void(const YAML::Node&, const std::string& key)>;

template <class T>
T as(const YAML::Node& v, const std::string& key, const char* what) {
  try {
    return v.as<T>();
  } catch (const YAML::Exception&) {
    fail("train config: '{}' must be {}", key, what);
  }
}

template <class T>
Setter bind(T& field, const char* what) {
  return [&field, what](const YAML::Node& v, const std::string& key) { field = as<T>(v, key, what); };
}

Setter bind_list(std::vector<std::string>& f) {
  return [&f](const YAML::Node& v, const std::string& key) {
    MD_CHECK(v.IsSequence() || v.IsNull(), "train config: '{}' must be a list of strings", key);
    f.clear();
    for (const auto& e : v) f.push_back(as<std::string>(e, key, "a list of strings"));
  };
}

Setter bind_list(std::vector<double>& f) {
  return [&f](const YAML::Node& v, const std::string& key) {
    MD_CHECK(v.IsSequence(), "train config: '{}' must be a list of numbers", key);
    f.clear();
    for (const auto& e : v) f.push_back(as<double>(e, key, "a list of numbers"));
  };
}

std::map<std::string, std::map<std::string, Setter>> bindings(TrainConfig& c) {
  std::map<std::string, std::map<std::string, Setter>> b;
  b["edm"] = {{"sigma_data", bind(c.edm.sigma_data, "a number")},
              {"P_mean", bind(c.edm.P_mean, "a number")},
              {"P_std", bind(c.edm.P_std, "a number")}};
  b["data"] = {{"shards", [&c](const YAML::Node& v, const std::string& key) {
                  if (v.IsSequence()) {
                    bind_list(c.shard_dirs)(v, key);
                    MD_CHECK(!c.shard_dirs.empty(), "train config: '{}' is an empty list", key);
                  } else {
                    c.shard_dirs = {as<std::string>(v, key, "a path or a list of paths")};
                  }
                  c.shards = c.shard_dirs.front();
                }},
               {"image_size", bind(c.image_size, "an integer")},
               {"val_shards", bind_list(c.val_shards)},
               {"latent_scale", bind(c.latent_scale, "a number")},
               {"train_split", bind(c.train_split, "a string")},
               {"val_split", bind(c.val_split, "a string")},
               {"caption_dropout", bind(c.caption_dropout, "a number")},
               {"stream_window", bind(c.stream_window, "an integer")},
               {"downsample", bind(c.downsample, "an integer")},
               {"text_encoder", bind(c.text_encoder, "an encoder name or path")}};
  b["train"] = {{"steps", bind(c.steps, "an integer")},
                {"batch_size", bind(c.batch_size, "an integer")},
                {"grad_accum", bind(c.grad_accum, "an integer")},
                {"mask_ratio", bind(c.mask_ratio, "a number")},
                {"unmasked_steps", bind(c.unmasked_steps, "an integer")},
                {"lr", bind(c.lr, "a number")},
                {"weight_decay", bind(c.weight_decay, "a number")},
                {"eps", bind(c.eps, "a number")},
                {"betas", [&c](const YAML::Node& v, const std::string& key) {
                   MD_CHECK(v.IsSequence() && v.size() == 2, "train config: '{}' must be [b1, b2]", key);
                   c.betas = {as<double>(v[0], key, "a number"), as<double>(v[1], key, "a number")};
                 }},
                {"warmup_steps", bind(c.warmup_steps, "an integer")},
                {"schedule", bind(c.schedule, "cosine or constant")},
                {"min_lr_ratio", bind(c.min_lr_ratio, "a number")},
                {"grad_clip", bind(c.grad_clip, "a number")},
                {"ema_decay", bind(c.ema_decay, "a number")},
                {"ema_start", bind(c.ema_start, "an integer")},
                {"bf16",
                 [&c](const YAML::Node& v, const std::string& key) {
                   c.bf16_auto = v.IsScalar() && v.Scalar() == "auto";
                   if (!c.bf16_auto) c.bf16 = as<bool>(v, key, "true, false or auto");
                 }},
                {"fused_optimizer", bind(c.fused_optimizer, "true or false")},
                {"bf16_weights", bind(c.bf16_weights, "auto, on or off")},
                {"cpu_workers", bind(c.cpu_workers, "an integer >= 0")},
                {"activation_checkpointing", bind(c.activation_checkpointing, "true or false")},
                {"cuda_graph", bind(c.cuda_graph, "true or false")},
                {"tf32", bind(c.tf32, "true or false")},
                {"low_precision_layernorm", bind(c.low_precision_layernorm, "true or false")},
                {"seed", bind(c.seed, "a non-negative integer")},
                {"shard_optimizer", bind(c.shard_optimizer, "true or false")},
                {"bucket_mb", bind(c.bucket_mb, "a number")}};
  b["stage"] = {{"init_from", bind(c.init_from, "a path")},
                {"init_weights", bind(c.init_weights, "raw or ema")},
                {"allow_missing", bind_list(c.init_allow_missing)},
                {"allow_unexpected", bind_list(c.init_allow_unexpected)}};
  b["run"] = {{"out", bind(c.out, "a path")},
              {"log_every", bind(c.log_every, "an integer")},
              {"checkpoint_every", bind(c.checkpoint_every, "an integer")},
              {"keep_last", bind(c.keep_last, "an integer")},
              {"val_every", bind(c.val_every, "an integer")},
              {"val_batches", bind(c.val_batches, "an integer")},
              {"val_sigmas", bind_list(c.val_sigmas)},
              {"sample_every", bind(c.sample_every, "an integer")},
              {"sample_prompts", bind_list(c.sample_prompts)},
              {"sample_steps", bind(c.sample_steps, "an integer")},
              {"sample_cfg", bind(c.sample_cfg, "a number")},
              {"sample_seed", bind(c.sample_seed, "a non-negative integer")},
              {"vae", bind(c.vae, "a path")}};
  return b;
}

}  // namespace

void TrainConfig::validate() const {
  model.validate();
  MD_CHECK(steps >= 1, "train config: train.steps must be >= 1");
  MD_CHECK(batch_size >= 1 && grad_accum >= 1, "train config: batch_size and grad_accum must be >= 1");
  MD_CHECK(cpu_workers >= 0, "train config: train.cpu_workers must be >= 0 (0: one per CPU thread), got {}",
           cpu_workers);
  MD_CHECK(batch_size % grad_accum == 0, "train config: batch_size {} is not divisible by grad_accum {}",
           batch_size, grad_accum);
  MD_CHECK(mask_ratio >= 0 && mask_ratio < 1, "train config: train.mask_ratio must be in [0, 1)");
  MD_CHECK(unmasked_steps >= 0 && unmasked_steps <= steps,
           "train config: train.unmasked_steps must be in [0, train.steps]");
  MD_CHECK(lr > 0, "train config: train.lr must be positive");
  MD_CHECK(!low_precision_layernorm || bf16 || bf16_auto,
           "train config: train.low_precision_layernorm runs LayerNorm in bf16 under autocast: it needs train.bf16: true");
  MD_CHECK(init_weights == "raw" || init_weights == "ema",
           "train config: stage.init_weights must be raw or ema, got '{}'", init_weights);
  MD_CHECK(bf16_weights == "auto" || bf16_weights == "on" || bf16_weights == "off",
           "train config: train.bf16_weights must be auto, on or off, got '{}'", bf16_weights);
  MD_CHECK(!cuda_graph || fused_optimizer,
           "train config: train.cuda_graph records the fused AdamW step: it needs train.fused_optimizer: true");
  MD_CHECK(!cuda_graph || !activation_checkpointing,
           "train config: train.cuda_graph does not record train.activation_checkpointing's recomputation; use one");
  MD_CHECK(schedule == "cosine" || schedule == "constant",
           "train config: train.schedule must be cosine or constant, got '{}'", schedule);
  MD_CHECK(caption_dropout >= 0 && caption_dropout <= 1, "train config: data.caption_dropout must be in [0, 1]");
  MD_CHECK(ema_decay >= 0 && ema_decay < 1, "train config: train.ema_decay must be in [0, 1)");
  MD_CHECK(edm.sigma_data > 0 && edm.P_std > 0, "train config: edm.sigma_data and edm.P_std must be positive");
  MD_CHECK(!shards.empty(), "train config: data.shards is not set");
  MD_CHECK(image_size >= 0 && image_size % 8 == 0, "train config: data.image_size must be a multiple of 8");
  MD_CHECK(latent_scale >= 0, "train config: data.latent_scale must be positive (0: automatic)");
  MD_CHECK(stream_window >= 0, "train config: data.stream_window must be >= 0");
  MD_CHECK(downsample >= 1, "train config: data.downsample must be >= 1 (1: images as stored), got {}", downsample);
  MD_CHECK(bucket_mb > 0, "train config: train.bucket_mb must be positive");
  MD_CHECK(keep_last >= 1, "train config: run.keep_last must be >= 1");
  MD_CHECK(sample_steps >= 1, "train config: run.sample_steps must be >= 1");
}

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides) {
  MD_CHECK(is_regular_file(path), "{}: no such config file", path);
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    fail("{}: {}", path, e.what());
  }
  if (!root.IsMap()) root = YAML::Node(YAML::NodeType::Map);
  for (const auto& ov : overrides) {  // section.key=value
    const auto eq = ov.find('='), dot = ov.find('.');
    MD_CHECK(eq != std::string::npos && dot != std::string::npos && dot < eq,
             "override '{}': expected section.key=value", ov);
    const std::string section = ov.substr(0, dot), key = ov.substr(dot + 1, eq - dot - 1);
    YAML::Node value;
    try {
      value = YAML::Load(ov.substr(eq + 1));
    } catch (const YAML::Exception&) {
      fail("override '{}': cannot parse the value", ov);
    }
    root[section][key] = value;
  }
  TrainConfig c;
  auto table = bindings(c);
  for (const auto& sec : root) {
    const std::string section = sec.first.as<std::string>();
    if (section == "model") {
      c.model = config_from_yaml(sec.second);
      continue;
    }
    auto it = table.find(section);
    MD_CHECK(it != table.end(), "train config: unknown section '{}'", section);
    MD_CHECK(sec.second.IsMap(), "train config: section '{}' must be a mapping", section);
    for (const auto& kv : sec.second) {
      const std::string key = kv.first.as<std::string>();
      auto s = it->second.find(key);
      MD_CHECK(s != it->second.end(), "train config: unknown key '{}.{}'", section, key);
      s->second(kv.second, section + "." + key);
    }
  }
  c.validate();
  return c;
}

namespace {

// "a.b.c" -> the scalar's text, or a sequence's flow text, for every leaf of a YAML map.
void flatten(const YAML::Node& n, const std::string& prefix, std::map<std::string, std::string>& out) {
  if (n.IsMap()) {
    for (const auto& kv : n) flatten(kv.second, prefix.empty() ? kv.first.as<std::string>() : prefix + "." + kv.first.as<std::string>(), out);
    return;
  }
  YAML::Emitter e;
  e << YAML::Flow << n;
  out[prefix] = e.c_str();
}

}  // namespace

std::vector<std::string> changed_settings(const std::string& before_yaml, const std::string& now_yaml) {
  std::map<std::string, std::string> a, b;
  try {
    flatten(YAML::Load(before_yaml), "", a);
    flatten(YAML::Load(now_yaml), "", b);
  } catch (const YAML::Exception&) {
    return {"(unreadable settings)"};
  }
  std::vector<std::string> changed;
  for (const auto& [k, v] : a)
    if (auto it = b.find(k); it == b.end() || it->second != v) changed.push_back(k);
  for (const auto& [k, v] : b)
    if (!a.count(k)) changed.push_back(k);
  return changed;
}

std::string resolve_bf16(TrainConfig& c, bool cuda) {
  if (!c.bf16_auto) return "";
  c.bf16_auto = false;
  c.bf16 = bf16_native(cuda);
  MD_CHECK(!c.low_precision_layernorm || c.bf16,
           "train config: train.low_precision_layernorm runs LayerNorm in bf16 under autocast, but train.bf16: auto "
           "chose float32 on this CPU (no AVX-512 BF16 or AMX): set train.bf16: true to force it");
  if (cuda) return "train.bf16: auto -> bf16 autocast (CUDA)";
  return c.bf16 ? "train.bf16: auto -> bf16 autocast (this CPU multiplies bf16: AVX-512 BF16 or AMX)"
                : "train.bf16: auto -> float32 (this CPU has no AVX-512 BF16 or AMX: bf16 would be emulated, "
                  "about 3x slower)";
}

std::string train_config_to_yaml(const TrainConfig& c) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  e << YAML::Key << "model" << YAML::Value << YAML::Load(config_to_yaml(c.model));
  e << YAML::Key << "edm" << YAML::Value << YAML::BeginMap << YAML::Key << "sigma_data" << YAML::Value
    << c.edm.sigma_data << YAML::Key << "P_mean" << YAML::Value << c.edm.P_mean << YAML::Key
    << "P_std" << YAML::Value << c.edm.P_std << YAML::EndMap;
  e << YAML::Key << "data" << YAML::Value << YAML::BeginMap;
  if (c.shard_dirs.size() > 1)
    e << YAML::Key << "shards" << YAML::Value << YAML::Flow << c.shard_dirs;
  else
    e << YAML::Key << "shards" << YAML::Value << c.shards;
  e << YAML::Key << "image_size" << YAML::Value << c.image_size << YAML::Key << "latent_scale"
    << YAML::Value << c.latent_scale;
  if (!c.val_shards.empty()) e << YAML::Key << "val_shards" << YAML::Value << YAML::Flow << c.val_shards;
  e << YAML::Key << "train_split" << YAML::Value
    << c.train_split << YAML::Key << "val_split" << YAML::Value << c.val_split << YAML::Key
    << "caption_dropout" << YAML::Value << c.caption_dropout << YAML::Key << "stream_window"
    << YAML::Value << c.stream_window << YAML::Key << "downsample" << YAML::Value << c.downsample
    << YAML::Key << "text_encoder"
    << YAML::Value << c.text_encoder << YAML::EndMap;
  e << YAML::Key << "train" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "steps" << YAML::Value << c.steps << YAML::Key << "batch_size" << YAML::Value
    << c.batch_size << YAML::Key << "grad_accum" << YAML::Value << c.grad_accum << YAML::Key
    << "mask_ratio" << YAML::Value << c.mask_ratio << YAML::Key << "unmasked_steps" << YAML::Value
    << c.unmasked_steps << YAML::Key << "lr" << YAML::Value << c.lr
    << YAML::Key << "weight_decay" << YAML::Value << c.weight_decay << YAML::Key << "eps"
    << YAML::Value << c.eps << YAML::Key << "betas" << YAML::Value << YAML::Flow << YAML::BeginSeq
    << c.betas[0] << c.betas[1] << YAML::EndSeq << YAML::Key << "warmup_steps" << YAML::Value
    << c.warmup_steps << YAML::Key << "schedule" << YAML::Value << c.schedule << YAML::Key
    << "min_lr_ratio" << YAML::Value << c.min_lr_ratio << YAML::Key << "grad_clip" << YAML::Value
    << c.grad_clip << YAML::Key << "ema_decay" << YAML::Value << c.ema_decay << YAML::Key
    << "ema_start" << YAML::Value << c.ema_start << YAML::Key << "bf16" << YAML::Value;
  if (c.bf16_auto) {
    e << "auto";  // undecided: resolve_bf16 not yet called
  } else {
    e << c.bf16;
  }
  e << YAML::Key << "fused_optimizer" << YAML::Value << c.fused_optimizer
    << YAML::Key << "cpu_workers" << YAML::Value << c.cpu_workers
    << YAML::Key << "activation_checkpointing" << YAML::Value << c.activation_checkpointing
    << YAML::Key << "tf32" << YAML::Value << c.tf32;
  if (c.low_precision_layernorm) e << YAML::Key << "low_precision_layernorm" << YAML::Value << true;
  if (c.cuda_graph) e << YAML::Key << "cuda_graph" << YAML::Value << true;
  if (c.bf16_weights != "auto") e << YAML::Key << "bf16_weights" << YAML::Value << c.bf16_weights;
  e << YAML::Key << "seed" << YAML::Value << c.seed << YAML::Key << "shard_optimizer" << YAML::Value
    << c.shard_optimizer << YAML::Key << "bucket_mb" << YAML::Value << c.bucket_mb << YAML::EndMap;
  e << YAML::EndMap;
  return e.c_str();
}

}  // namespace microdit
