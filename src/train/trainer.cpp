#include "train/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/cuda.h>
#include <torch/nn/utils/clip_grad.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>

#include "core/autocast.h"
#include "core/error.h"
#include "core/fs.h"
#include "io/atomic_file.h"
#include "io/checkpoint.h"

#include <nlohmann/json.hpp>
#include <unistd.h>

namespace microdit {

constexpr const char* kCheckpointFormat = "microdit-checkpoint";

double learning_rate(const TrainConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.lr * (step + 1) / static_cast<double>(c.warmup_steps);
  if (c.schedule == "constant") return c.lr;
  const double span = std::max<int64_t>(1, c.steps - c.warmup_steps);
  const double progress = std::min(1.0, (step - c.warmup_steps) / span);
  const double floor = c.lr * c.min_lr_ratio;
  return floor + (c.lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

// ---- EMA -------------------------------------------------------------------------------

EMA::EMA(torch::nn::Module& model, double decay, int64_t start) : decay_(decay), start_(start) {
  for (const auto& p : model.named_parameters()) shadow_.emplace_back(p.key(), p.value().detach().clone());
}

void EMA::update(torch::nn::Module& model, int64_t step) {
  torch::NoGradGuard ng;
  auto params = model.named_parameters();
  for (auto& [name, s] : shadow_) {
    const auto& p = params[name];
    if (step < start_) s.copy_(p);
    else s.mul_(decay_).add_(p.detach(), 1.0 - decay_);
  }
}

void EMA::load(const NamedTensors& t) {
  std::map<std::string, Tensor> by_name(t.begin(), t.end());
  torch::NoGradGuard ng;
  for (auto& [name, s] : shadow_) {
    auto it = by_name.find(name);
    MD_CHECK(it != by_name.end(), "checkpoint: EMA tensor '{}' is missing", name);
    s.copy_(it->second);
  }
}

void EMA::swap_into(torch::nn::Module& model) {
  torch::NoGradGuard ng;
  auto params = model.named_parameters();
  for (auto& [name, s] : shadow_) {
    auto tmp = params[name].detach().clone();
    params[name].copy_(s);
    s.copy_(tmp);
  }
}

// ---- checkpoints -----------------------------------------------------------------------

static std::string checkpoint_dir(const std::string& out) { return out + "/checkpoints"; }

static std::vector<std::string> checkpoint_files(const std::string& out) {
  std::vector<std::string> files;
  for (const auto& n : list_dir(checkpoint_dir(out)))
    if (n.rfind("step-", 0) == 0 && n.size() > 12 && n.substr(n.size() - 12) == ".safetensors")
      files.push_back(checkpoint_dir(out) + "/" + n);
  return files;  // sorted by step (zero-padded names)
}

std::string latest_checkpoint(const std::string& out) {
  auto files = checkpoint_files(out);
  return files.empty() ? "" : files.back();
}

std::string final_checkpoint_path(const TrainConfig& cfg) {
  return fmt::format("{}/checkpoints/step-{:07d}.safetensors", cfg.out, cfg.steps);
}

// ---- trainer ---------------------------------------------------------------------------

Trainer::Trainer(TrainConfig cfg, c10::Device device)
    : cfg_(std::move(cfg)), device_(device),
      gen_(at::make_generator<at::CPUGeneratorImpl>(cfg_.seed)) {
  cfg_.validate();
  const auto idx = read_shard_index(cfg_.shards);
  MD_CHECK(idx.image_shape.size() == 3 && idx.image_shape[0] == cfg_.model.in_channels &&
               idx.image_shape[1] == cfg_.model.input_size && idx.image_shape[2] == cfg_.model.input_size,
           "shards hold images of shape [{}] but the model takes [{}, {}, {}]",
           fmt::join(idx.image_shape, ", "), cfg_.model.in_channels, cfg_.model.input_size,
           cfg_.model.input_size);
  MD_CHECK(idx.caption_shape.size() == 2 && idx.caption_shape[1] == cfg_.model.caption_channels,
           "shards hold captions {} wide but the model takes caption_channels {}",
           idx.caption_shape.size() == 2 ? idx.caption_shape[1] : -1, cfg_.model.caption_channels);
  caption_len_ = idx.caption_shape[0];
  encoder_ = idx.encoder;
  if (cfg_.stream_window > 0) train_stream_ = open_stream(cfg_.shards, cfg_.train_split, cfg_.stream_window);
  else train_ = load_split(cfg_.shards, cfg_.train_split);
  if (idx.shards.count(cfg_.val_split)) val_ = load_split(cfg_.shards, cfg_.val_split);
  const int64_t n_train = cfg_.stream_window > 0 ? train_stream_.size() : train_.size();
  MD_CHECK(cfg_.batch_size <= n_train, "batch_size {} exceeds the {} training samples",
           cfg_.batch_size, n_train);

  torch::manual_seed(cfg_.seed);  // model initialisation
  model_ = MicroDiT(cfg_.model);
  if (!cfg_.init_from.empty()) {  // stage transition: weights only, optimizer starts fresh
    LoadOptions lo;
    lo.allow_missing = cfg_.init_allow_missing;
    lo.allow_unexpected = cfg_.init_allow_unexpected;
    auto tensors = read_checkpoint(cfg_.init_from);
    // Our own checkpoints hold model.* (and ema.*): take the model's weights. The positional
    // table is a fixed buffer rebuilt for this stage's resolution, never loaded.
    NamedTensors weights;
    bool ours = false;
    for (const auto& [k, t] : tensors) ours |= k.rfind("model.", 0) == 0;
    for (const auto& [k, t] : tensors) {
      std::string name = ours ? (k.rfind("model.", 0) == 0 ? k.substr(6) : "") : k;
      if (!name.empty() && name != "pos_embed") weights.emplace_back(name, t);
    }
    lo.allow_missing.push_back("pos_embed");
    load_state_dict(*model_, weights, lo, cfg_.init_from);
  }
  model_->to(device_);
  model_->train();
  opt_ = std::make_unique<torch::optim::AdamW>(
      model_->parameters(), torch::optim::AdamWOptions(cfg_.lr)
                                .betas({cfg_.betas[0], cfg_.betas[1]})
                                .eps(cfg_.eps)
                                .weight_decay(cfg_.weight_decay));
  if (cfg_.ema_decay > 0) ema_ = std::make_unique<EMA>(*model_, cfg_.ema_decay, cfg_.ema_start);
  MD_CHECK(make_dirs(checkpoint_dir(cfg_.out)), "{}: cannot create the run folder", cfg_.out);
}

Trainer::~Trainer() = default;

void Trainer::save_checkpoint() {
  NamedTensors t;
  for (const auto& [k, v] : state_dict(*model_)) t.emplace_back("model." + k, v);
  if (ema_)
    for (const auto& [k, v] : ema_->tensors()) t.emplace_back("ema." + k, v);
  int64_t adam_step = 0;
  for (const auto& p : model_->named_parameters()) {
    auto it = opt_->state().find(p.value().unsafeGetTensorImpl());
    if (it == opt_->state().end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    t.emplace_back("optim." + p.key() + ".exp_avg", s.exp_avg());
    t.emplace_back("optim." + p.key() + ".exp_avg_sq", s.exp_avg_sq());
    adam_step = s.step();
  }
  t.emplace_back("rng.train", gen_.get_state());
  const std::string path =
      fmt::format("{}/step-{:07d}.safetensors", checkpoint_dir(cfg_.out), state_.step);
  write_safetensors(path, t,
                    {{"format", kCheckpointFormat},
                     {"version", "1"},
                     {"step", std::to_string(state_.step)},
                     {"epoch", std::to_string(state_.epoch)},
                     {"position", std::to_string(state_.position)},
                     {"adam_step", std::to_string(adam_step)},
                     {"caption_len", std::to_string(caption_len_)},
                     {"text_encoder", encoder_},
                     {"sigma_data", fmt::format("{}", cfg_.edm.sigma_data)},
                     {"train_config", train_config_to_yaml(cfg_)},
                     {"microdit_config", config_to_yaml(cfg_.model)}});
  auto files = checkpoint_files(cfg_.out);
  for (size_t i = 0; i + cfg_.keep_last < files.size(); ++i) std::remove(files[i].c_str());
}

bool Trainer::resume() {
  const std::string path = latest_checkpoint(cfg_.out);
  if (path.empty()) return false;
  auto f = read_safetensors(path);
  MD_CHECK(f.metadata.count("format") && f.metadata.at("format") == kCheckpointFormat,
           "{}: not a microdit training checkpoint", path);
  MD_CHECK(f.metadata.at("microdit_config") == config_to_yaml(cfg_.model),
           "{}: checkpoint is from another model configuration", path);
  NamedTensors model, ema;
  std::map<std::string, Tensor> rest;
  for (auto& [k, v] : f.tensors) {
    if (k.rfind("model.", 0) == 0) model.emplace_back(k.substr(6), v);
    else if (k.rfind("ema.", 0) == 0) ema.emplace_back(k.substr(4), v);
    else rest[k] = v;
  }
  load_state_dict(*model_, model, {}, path);
  if (ema_) ema_->load(ema);
  const int64_t adam_step = std::stoll(f.metadata.at("adam_step"));
  for (const auto& p : model_->named_parameters()) {
    auto a = rest.find("optim." + p.key() + ".exp_avg"), b = rest.find("optim." + p.key() + ".exp_avg_sq");
    if (a == rest.end() || b == rest.end()) continue;
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(adam_step);
    s->exp_avg(a->second.to(p.value().device()));
    s->exp_avg_sq(b->second.to(p.value().device()));
    opt_->state()[p.value().unsafeGetTensorImpl()] = std::move(s);
  }
  MD_CHECK(rest.count("rng.train"), "{}: checkpoint lacks the random generator state", path);
  gen_.set_state(rest.at("rng.train"));
  state_.step = std::stoll(f.metadata.at("step"));
  state_.epoch = std::stoll(f.metadata.at("epoch"));
  state_.position = std::stoll(f.metadata.at("position"));
  // Keep the metrics written up to this checkpoint, drop those of the lost steps.
  const std::string metrics = cfg_.out + "/metrics.jsonl";
  std::ifstream in(metrics);
  std::string line, kept;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("step", int64_t{0}) <= state_.step) kept += line + "\n";
  }
  AtomicFile outf(metrics);
  outf.write(kept.data(), kept.size());
  outf.commit();
  return true;
}

void Trainer::log_metrics(const std::string& line) {
  std::ofstream(cfg_.out + "/metrics.jsonl", std::ios::app) << line << "\n";
}

double Trainer::train_step(const Batch& b) {
  const int64_t B = b.images.size(0), micro = B / cfg_.grad_accum;
  const int64_t T = cfg_.model.num_tokens();
  opt_->zero_grad();
  double total = 0;
  for (int64_t m = 0; m < cfg_.grad_accum; ++m) {
    auto x = b.images.narrow(0, m * micro, micro);
    auto y = b.captions.narrow(0, m * micro, micro).unsqueeze(1);  // (b, 1, L, W)
    // Draws on the CPU generator, in a fixed order, so a resumed run repeats them exactly.
    auto keep = (at::rand({micro}, gen_) >= cfg_.caption_dropout).to(at::kFloat);
    LossDraws d;
    d.rnd_normal = at::randn({micro, 1, 1, 1}, gen_);
    d.noise = at::randn(x.sizes(), gen_);
    // Deferred masking, except in the last `unmasked_steps` steps (the paper's unmasked
    // fine-tuning, which closes the gap to sampling, where every patch is seen).
    const bool masked = cfg_.mask_ratio > 0 && state_.step < cfg_.steps - cfg_.unmasked_steps;
    if (masked) {
      auto noise = at::rand({micro, T}, gen_).to(device_);
      d.mask = mask_from_noise(noise, cfg_.model.kept_tokens(cfg_.mask_ratio));
    }
    y = y * keep.view({micro, 1, 1, 1});
    d.rnd_normal = d.rnd_normal.to(device_);
    d.noise = d.noise.to(device_);
    Tensor loss;
    {
      AutocastGuard autocast(device_.type(), cfg_.bf16);
      loss = edm_loss(*model_, x.to(device_), y.to(device_), d, cfg_.edm);
    }
    (loss / static_cast<double>(cfg_.grad_accum)).backward();
    total += loss.item<double>() / cfg_.grad_accum;
  }
  return total;
}

double Trainer::validation_loss() {
  if (val_.size() == 0) return NAN;
  torch::NoGradGuard ng;
  model_->eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(12345);  // same noise every time
  const int64_t B = std::min<int64_t>(cfg_.batch_size, val_.size());
  const double sd = cfg_.edm.sigma_data;
  double sum = 0;
  int count = 0;
  for (int64_t i = 0; i < cfg_.val_batches && (i + 1) * B <= val_.size(); ++i) {
    auto x = val_.images.narrow(0, i * B, B).to(at::kFloat);
    auto y = val_.captions.narrow(0, i * B, B).to(at::kFloat).unsqueeze(1);
    for (double s : cfg_.val_sigmas) {
      auto eps = at::randn(x.sizes(), gen);
      auto xd = x.to(device_), yd = y.to(device_);
      auto sigma = torch::full({B}, s, xd.options());
      auto D = edm_denoise(*model_, xd + s * eps.to(device_), sigma, yd, cfg_.edm);
      const double w = (s * s + sd * sd) / (s * sd * s * sd);
      sum += w * (D - xd).pow(2).mean().item<double>();
      ++count;
    }
  }
  model_->train();
  return count ? sum / count : NAN;
}

void Trainer::run(int64_t stop_at) {
  const int64_t end = stop_at > 0 ? std::min(stop_at, cfg_.steps) : cfg_.steps;
  auto loader = cfg_.stream_window > 0
                    ? std::make_unique<BatchLoader>(train_stream_, cfg_.batch_size, cfg_.seed, state_.epoch,
                                                    state_.position)
                    : std::make_unique<BatchLoader>(train_, cfg_.batch_size, cfg_.seed, state_.epoch,
                                                    state_.position);
  const int64_t start = state_.step;
  auto t0 = std::chrono::steady_clock::now();
  const bool tty = ::isatty(::fileno(stdout));
  if (start == 0) {
    const double v = validation_loss();
    if (!std::isnan(v)) log_metrics(fmt::format(R"({{"step": 0, "val_loss": {:.6f}}})", v));
  }
  double ema_loss = NAN;
  while (state_.step < end) {
    const double lr = learning_rate(cfg_, state_.step);
    for (auto& g : opt_->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    Batch b = loader->next();
    const double loss = train_step(b);
    double gnorm = NAN;
    if (cfg_.grad_clip > 0) gnorm = torch::nn::utils::clip_grad_norm_(model_->parameters(), cfg_.grad_clip);
    opt_->step();
    ++state_.step;
    state_.epoch = b.epoch;
    state_.position = b.position;
    if (ema_) ema_->update(*model_, state_.step);
    MD_CHECK(std::isfinite(loss), "training diverged at step {} (loss {}); lower train.lr", state_.step, loss);
    ema_loss = std::isnan(ema_loss) ? loss : 0.9 * ema_loss + 0.1 * loss;

    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double ips = (state_.step - start) * cfg_.batch_size / secs;
    const double eta = (cfg_.steps - state_.step) * cfg_.batch_size / std::max(ips, 1e-9);
    if (state_.step % cfg_.log_every == 0 || state_.step == cfg_.steps) {
      log_metrics(fmt::format(R"({{"step": {}, "loss": {:.6f}, "lr": {:.4e}, "grad_norm": {:.4f}, "images_per_s": {:.2f}, "epoch": {}}})",
                              state_.step, loss, lr, gnorm, ips, b.epoch));
      fmt::print("{}step {}/{}  loss {:.4f}  lr {:.2e}  {:.1f} img/s  ETA {:02d}:{:02d}{}", tty ? "\r" : "",
                 state_.step, cfg_.steps, ema_loss, lr, ips, static_cast<int>(eta) / 60,
                 static_cast<int>(eta) % 60, tty ? "   " : "\n");
      std::fflush(stdout);
    }
    if (cfg_.val_every > 0 && state_.step % cfg_.val_every == 0) {
      const double v = validation_loss();
      if (!std::isnan(v)) {
        log_metrics(fmt::format(R"({{"step": {}, "val_loss": {:.6f}}})", state_.step, v));
        fmt::print("{}step {}  validation loss {:.4f}\n", tty ? "\n" : "", state_.step, v);
      }
    }
    if (on_sample && cfg_.sample_every > 0 && state_.step % cfg_.sample_every == 0) {
      if (ema_) ema_->swap_into(*model_);
      model_->eval();
      on_sample(*model_, state_.step);
      model_->train();
      if (ema_) ema_->swap_into(*model_);
    }
    if (state_.step % cfg_.checkpoint_every == 0 || state_.step == end) save_checkpoint();
  }
  if (tty) fmt::print("\n");
  if (on_finish && state_.step == cfg_.steps) on_finish(cfg_.out + "/metrics.jsonl");
}

}  // namespace microdit
