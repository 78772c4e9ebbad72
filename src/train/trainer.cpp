#include "train/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/cuda.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <thread>

#include "core/autocast.h"
#include "core/cpu_workers.h"
#include "core/cuda_graph.h"
#include "core/error.h"
#include "core/fs.h"
#include "dist/dist.h"
#include "dist/grad_sync.h"
#include "io/atomic_file.h"
#include "io/checkpoint.h"
#include "core/precision.h"
#include "train/bf16_weights.h"
#include "train/fused_adamw.h"
#include "train/grad_clip.h"
#include "train/parallel_backward.h"
#include "data/latent_source.h"

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
  for (const auto& p : model.named_parameters()) {
    shadow_.emplace_back(p.key(), p.value().detach().clone());
    fused_.shadow.emplace(p.value().unsafeGetTensorImpl(), shadow_.back().second);
  }
}

void EMA::update(torch::nn::Module& model, int64_t step) {
  torch::NoGradGuard ng;
  auto params = model.named_parameters();
  std::vector<Tensor> s_list, p_list;
  for (auto& [name, s] : shadow_) {
    s_list.push_back(s);
    p_list.push_back(params[name].detach());
  }
  if (step < start_) at::_foreach_copy_(s_list, p_list);
  else at::_foreach_lerp_(s_list, p_list, 1.0 - decay_);  // s = decay s + (1 - decay) p, fused
}

const FusedEma& EMA::fused(int64_t step) {
  fused_.weight_step = step < start_ ? 1.0 : 1.0 - decay_;  // lerp by 1: a copy
  return fused_;
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

// The settings in a checkpoint's metadata that differ from cfg's.
static std::vector<std::string> changed_since(const std::map<std::string, std::string>& metadata,
                                              const TrainConfig& cfg) {
  auto it = metadata.find("train_config");
  if (it == metadata.end()) return {"(no settings recorded)"};
  return changed_settings(it->second, train_config_to_yaml(cfg));
}

std::vector<std::string> settings_changed_since_checkpoint(const TrainConfig& cfg) {
  const std::string path = latest_checkpoint(cfg.out);
  if (path.empty()) return {};
  return changed_since(read_safetensors(path, /*with_data=*/false).metadata, cfg);
}

// ---- per-sample randomness --------------------------------------------------------------

static uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

SampleDraws draw_samples(uint64_t seed, int64_t step, int64_t first, int64_t n,
                         c10::IntArrayRef sample_shape, int64_t tokens, bool masked,
                         double caption_dropout) {
  std::vector<Tensor> keep, rn, noise, mask;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t key = mix64(mix64(mix64(seed) ^ static_cast<uint64_t>(step)) ^ static_cast<uint64_t>(first + i));
    auto gen = at::make_generator<at::CPUGeneratorImpl>(key);
    keep.push_back(at::rand({1}, gen));
    rn.push_back(at::randn({1}, gen));
    noise.push_back(at::randn(sample_shape, gen));
    if (masked) mask.push_back(at::rand({tokens}, gen));
  }
  SampleDraws d;
  d.keep = (at::cat(keep) >= caption_dropout).to(at::kFloat);
  d.rnd_normal = at::cat(rn).view({n, 1, 1, 1});
  d.noise = at::stack(noise);
  if (masked) d.mask_noise = at::stack(mask);
  return d;
}

// ---- data ------------------------------------------------------------------------------

// The training set: our shards (`microdit prepare` on pixels), or one or more latent MDS
// folders (the reference's precomputed latents, or `microdit prepare --vae`), told apart by
// their index.json. Sets the caption length, the text encoder and the latent space recorded
// in checkpoints.
void Trainer::open_data() {
  const std::vector<std::string> dirs = cfg_.shard_dirs.empty() ? std::vector<std::string>{cfg_.shards}
                                                                : cfg_.shard_dirs;
  const auto& m = cfg_.model;
  if (is_mds_dir(dirs.front())) {
    MD_CHECK(cfg_.downsample == 1, "{}: data.downsample is for pixel shards, not latents", dirs.front());
    const int image_size = cfg_.image_size > 0 ? cfg_.image_size : 8 * static_cast<int>(m.input_size);
    mds_ = std::make_unique<LatentMDSSource>(dirs, image_size, m.caption_channels);
    const auto& is = mds_->image_shape();
    MD_CHECK(is[0] == m.in_channels && is[1] == m.input_size && is[2] == m.input_size,
             "{}: column {} holds latents of shape [{}] but the model takes [{}, {}, {}]", dirs.front(),
             mds_->column(), fmt::join(is, ", "), m.in_channels, m.input_size, m.input_size);
    caption_len_ = mds_->caption_shape()[0];
    const auto& info = mds_->info();
    encoder_ = info.encoder.empty() ? cfg_.text_encoder : info.encoder;
    latent_scale_ = cfg_.latent_scale > 0 ? cfg_.latent_scale
                    : info.scaling_factor > 0 ? info.scaling_factor : 0.13025;
    latent_image_size_ = image_size;
    if (!cfg_.val_shards.empty()) {  // validation: the first val_batches x batch_size samples
      LatentMDSSource val(cfg_.val_shards, image_size, m.caption_channels);
      MD_CHECK(val.image_shape() == mds_->image_shape() && val.caption_shape() == mds_->caption_shape(),
               "{}: validation latents/captions differ in shape from the training set", cfg_.val_shards.front());
      const int64_t n = std::min(val.size(), cfg_.val_batches * cfg_.batch_size);
      std::vector<int64_t> ids(n);
      for (int64_t i = 0; i < n; ++i) ids[i] = i;
      val.gather(ids, val_.images, val_.captions);
    }
    MD_CHECK(cfg_.batch_size <= mds_->size(), "batch_size {} exceeds the {} training samples",
             cfg_.batch_size, mds_->size());
    return;
  }
  MD_CHECK(dirs.size() == 1, "{}: several data.shards folders are only read for latent MDS datasets",
           dirs.front());
  MD_CHECK(cfg_.val_shards.empty(), "data.val_shards is for latent MDS datasets; ours hold a val split");
  const auto idx = read_shard_index(cfg_.shards);
  const int64_t k = cfg_.downsample, side = k * m.input_size;  // stored side
  const bool square = idx.image_shape.size() == 3 && idx.image_shape[1] == idx.image_shape[2];
  std::string hint;  // what data.downsample does, or would do, to these images
  if (k > 1) hint = fmt::format(" after data.downsample {} (stored {} x {})", k, side, side);
  else if (square && idx.image_shape[1] > m.input_size && idx.image_shape[1] % m.input_size == 0)
    hint = fmt::format(" (data.downsample {} trains on them at {} x {})", idx.image_shape[1] / m.input_size,
                       m.input_size, m.input_size);
  MD_CHECK(square && idx.image_shape[0] == m.in_channels && idx.image_shape[1] == side,
           "shards hold images of shape [{}] but the model takes [{}, {}, {}]{}", fmt::join(idx.image_shape, ", "),
           m.in_channels, m.input_size, m.input_size, hint);
  MD_CHECK(idx.caption_shape.size() == 2 && idx.caption_shape[1] == m.caption_channels,
           "shards hold captions {} wide but the model takes caption_channels {}",
           idx.caption_shape.size() == 2 ? idx.caption_shape[1] : -1, m.caption_channels);
  caption_len_ = idx.caption_shape[0];
  encoder_ = idx.encoder;
  if (cfg_.stream_window > 0) train_stream_ = open_stream(cfg_.shards, cfg_.train_split, cfg_.stream_window);
  else train_ = load_split(cfg_.shards, cfg_.train_split);
  if (idx.shards.count(cfg_.val_split)) {
    val_ = load_split(cfg_.shards, cfg_.val_split);
    val_.images = downsampled(val_.images.to(at::kFloat)).to(val_.images.dtype());
  }
  const int64_t n_train = cfg_.stream_window > 0 ? train_stream_.size() : train_.size();
  MD_CHECK(cfg_.batch_size <= n_train, "batch_size {} exceeds the {} training samples",
           cfg_.batch_size, n_train);
}

// data.downsample k: the mean of each k x k pixel block, (N, C, kH, kW) -> (N, C, H, W).
Tensor Trainer::downsampled(const Tensor& images) const {
  const int64_t k = cfg_.downsample;
  return k == 1 ? images : at::avg_pool2d(images, {k, k});
}

// ---- trainer ---------------------------------------------------------------------------

Trainer::Trainer(TrainConfig cfg, c10::Device device, dist::Comm* comm)
    : cfg_(std::move(cfg)), device_(device), comm_(comm) {
  cfg_.validate();
  resolve_bf16(cfg_, device_.is_cuda());  // train.bf16: auto, where the CLI has not decided it
  MD_CHECK(!cfg_.cuda_graph || device_.is_cuda(), "train.cuda_graph needs a CUDA device (this run is on {})",
           device_.str());
  MD_CHECK(!cfg_.cuda_graph || comm == nullptr,
           "train.cuda_graph records one process's step: not with several processes");
  if (comm_) rank_ = comm_->rank(), world_ = comm_->world();
  MD_CHECK(cfg_.batch_size % (world_ * cfg_.grad_accum) == 0,
           "train.batch_size {} is not divisible by {} ranks x train.grad_accum {}", cfg_.batch_size,
           world_, cfg_.grad_accum);
  open_data();

  torch::manual_seed(cfg_.seed);  // model initialisation
  model_ = MicroDiT(cfg_.model);
  if (!cfg_.init_from.empty()) {  // stage transition: weights only, optimizer starts fresh
    LoadOptions lo;
    lo.allow_missing = cfg_.init_allow_missing;
    lo.allow_unexpected = cfg_.init_allow_unexpected;
    // Our own checkpoints hold model.* and ema.*; a foreign one (the reference's, a converted
    // file) is found by its x_embedder key. The positional table is a fixed buffer rebuilt for
    // this stage's resolution, never loaded.
    MD_CHECK(is_regular_file(cfg_.init_from), "stage.init_from {}: no such file (train the earlier stage first)",
             cfg_.init_from);
    auto all = read_checkpoint(cfg_.init_from, "");
    bool ours = false, has_ema = false;
    for (const auto& [k, t] : all) ours |= k.rfind("model.", 0) == 0, has_ema |= k.rfind("ema.", 0) == 0;
    NamedTensors weights;
    if (ours) {
      const bool ema = cfg_.init_weights == "ema";
      MD_CHECK(!ema || has_ema, "{}: stage.init_weights is ema but the checkpoint holds no EMA weights",
               cfg_.init_from);
      // model.* first (it also holds the buffers, such as mask_token), then ema.* in its place.
      std::map<std::string, Tensor> by_name;
      for (const auto& [k, t] : all)
        if (k.rfind("model.", 0) == 0) by_name[k.substr(6)] = t;
      if (ema)
        for (const auto& [k, t] : all)
          if (k.rfind("ema.", 0) == 0) by_name[k.substr(4)] = t;
      for (auto& [k, t] : by_name)
        if (k != "pos_embed") weights.emplace_back(k, t);
    } else {
      for (auto& [k, t] : under_anchor(std::move(all)))
        if (k != "pos_embed") weights.emplace_back(k, t);
    }
    lo.allow_missing.push_back("pos_embed");
    load_state_dict(*model_, weights, lo, cfg_.init_from);
  }
  model_->to(device_);
  model_->train();
  model_->recompute_blocks = cfg_.activation_checkpointing;
  set_low_precision_layernorm(*model_, cfg_.low_precision_layernorm);
  set_tf32(cfg_.tf32);
  const auto adamw = torch::optim::AdamWOptions(cfg_.lr)
                         .betas({cfg_.betas[0], cfg_.betas[1]})
                         .eps(cfg_.eps)
                         .weight_decay(cfg_.weight_decay);
  if (comm_) {  // parameters move into flat buffers; rank 0's weights win
    dist::GradSyncOptions so;
    so.bucket_bytes = static_cast<int64_t>(cfg_.bucket_mb * (1 << 20));
    so.first_bucket_bytes = std::min<int64_t>(so.bucket_bytes, 1 << 20);
    so.shard = cfg_.shard_optimizer;
    so.adamw = adamw;
    sync_ = std::make_unique<dist::GradSync>(*model_, *comm_, so);
    sync_->skip_average = std::getenv("MICRODIT_TEST_NO_AVERAGE") != nullptr;  // negative control
    sync_->broadcast_params();
  }
  workers_ = resolve_cpu_workers(cfg_.cpu_workers, device_, comm_ != nullptr);
  params_ = model_->parameters();  // walked once: the modules' names are strings built per call
  if (!sync_ || !cfg_.shard_optimizer) opt_ = std::make_unique<torch::optim::AdamW>(params_, adamw);
  if (use_bf16_weights(parse_bf16_weights("train.bf16_weights", cfg_.bf16_weights), device_, cfg_.bf16,
                       cfg_.fused_optimizer, sync_ && cfg_.shard_optimizer, "train.bf16_weights")) {
    copies_ = std::make_unique<Bf16Weights>(*model_);
    // Several backward passes per step, or the buckets' reduction across processes: the copies'
    // gradients are summed in float32 on the weights (each weight's .grad, a view into the
    // buckets when data-parallel), as soon as each is complete.
    if (cfg_.grad_accum > 1 || sync_) copies_->sum_gradients_in_float32();
  }
  // EMA weights are only written by rank 0.
  if (cfg_.ema_decay > 0 && rank_ == 0) ema_ = std::make_unique<EMA>(*model_, cfg_.ema_decay, cfg_.ema_start);
  if (rank_ == 0) MD_CHECK(make_dirs(checkpoint_dir(cfg_.out)), "{}: cannot create the run folder", cfg_.out);
}

Trainer::~Trainer() = default;

std::string Trainer::precision_summary() const {
  if (!copies_) return "";
  return fmt::format("bf16 weight copies: {} weights ({:.4g} M parameters) multiplied as bf16 copies that the AdamW "
                     "step writes (train.bf16_weights)",
                     copies_->size(), copies_->numel() / 1e6) +
         (copies_->sums_in_float32() ? ", their gradients summed in float32" : "");
}

std::string Trainer::parallel_summary() const {
  if (!comm_)
    return workers_ > 1 ? fmt::format("data parallel inside the process: {} CPU workers of one thread, {} "
                                      "samples each per step (train.cpu_workers)",
                                      workers_, cfg_.batch_size / cfg_.grad_accum / workers_)
                        : "";
  std::string s = fmt::format("data parallel: {} ranks ({}), {} samples per rank per step, {} gradient buckets",
                              world_, comm_->backend_name(), cfg_.batch_size / world_, sync_->buckets());
  if (cfg_.shard_optimizer)
    s += fmt::format("; sharded AdamW: moments {:.1f} MB per rank instead of {:.1f} MB (saves {:.1f} MB)",
                     sync_->moment_bytes() / 1e6, sync_->unsharded_moment_bytes() / 1e6,
                     (sync_->unsharded_moment_bytes() - sync_->moment_bytes()) / 1e6);
  return s;
}

// The space the model was trained in, for sampling: pixels, or a VAE's scaled latents.
std::string Trainer::latent_json() const {
  nlohmann::json j;
  if (latent_scale_ > 0) {
    j = {{"space", "vae"}, {"scaling_factor", latent_scale_}, {"channels", cfg_.model.in_channels},
         {"image_size", latent_image_size_}};
    if (!cfg_.vae.empty()) j["vae"] = cfg_.vae;
  } else {
    j = {{"space", "pixels"}};
  }
  return j.dump();
}

void Trainer::save_checkpoint() {
  std::map<std::string, std::pair<Tensor, Tensor>> sharded;
  if (!opt_) sharded = sync_->gather_moments();  // a collective: every rank takes part
  if (rank_ != 0) return;
  NamedTensors t;
  for (const auto& [k, v] : state_dict(*model_)) t.emplace_back("model." + k, v);
  if (ema_)
    for (const auto& [k, v] : ema_->tensors()) t.emplace_back("ema." + k, v);
  int64_t adam_step = 0;
  for (const auto& p : model_->named_parameters()) {
    if (!opt_) {
      auto it = sharded.find(p.key());
      if (it == sharded.end()) continue;
      t.emplace_back("optim." + p.key() + ".exp_avg", it->second.first);
      t.emplace_back("optim." + p.key() + ".exp_avg_sq", it->second.second);
      adam_step = sync_->adam_step();
      continue;
    }
    auto it = opt_->state().find(p.value().unsafeGetTensorImpl());
    if (it == opt_->state().end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    t.emplace_back("optim." + p.key() + ".exp_avg", s.exp_avg());
    t.emplace_back("optim." + p.key() + ".exp_avg_sq", s.exp_avg_sq());
    adam_step = s.step();
  }
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
                     {"latent", latent_json()},
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
  if (rank_ == 0) {
    const auto changed = changed_since(f.metadata, cfg_);
    if (!changed.empty())
      fmt::print("warning: {} was written under other settings ({}); the run goes on with the current "
                 "ones (start a fresh run.out for a clean run)\n",
                 path, fmt::join(changed, ", "));
  }
  NamedTensors model, ema;
  std::map<std::string, Tensor> rest;
  for (auto& [k, v] : f.tensors) {
    if (k.rfind("model.", 0) == 0) model.emplace_back(k.substr(6), v);
    else if (k.rfind("ema.", 0) == 0) ema.emplace_back(k.substr(4), v);
    else rest[k] = v;
  }
  load_state_dict(*model_, model, {}, path);
  if (copies_) copies_->invalidate();
  if (ema_) ema_->load(ema);
  const int64_t adam_step = std::stoll(f.metadata.at("adam_step"));
  if (sync_) sync_->params_changed();
  if (!opt_) {  // sharded: every rank takes its slices of the full moments
    std::map<std::string, std::pair<Tensor, Tensor>> moments;
    for (const auto& p : model_->named_parameters()) {
      auto a = rest.find("optim." + p.key() + ".exp_avg"), b = rest.find("optim." + p.key() + ".exp_avg_sq");
      if (a != rest.end() && b != rest.end()) moments[p.key()] = {a->second.to(device_), b->second.to(device_)};
    }
    sync_->load_moments(moments, adam_step);
  }
  for (const auto& p : model_->named_parameters()) {
    if (!opt_) break;
    auto a = rest.find("optim." + p.key() + ".exp_avg"), b = rest.find("optim." + p.key() + ".exp_avg_sq");
    if (a == rest.end() || b == rest.end()) continue;
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(adam_step);
    s->exp_avg(a->second.to(p.value().device()));
    s->exp_avg_sq(b->second.to(p.value().device()));
    opt_->state()[p.value().unsafeGetTensorImpl()] = std::move(s);
  }
  // Training draws are keyed by (seed, step, sample), so no generator state is needed
  // (checkpoints of earlier versions hold an unused "rng.train").
  state_.step = std::stoll(f.metadata.at("step"));
  state_.epoch = std::stoll(f.metadata.at("epoch"));
  state_.position = std::stoll(f.metadata.at("position"));
  if (comm_) comm_->barrier();  // everyone has read the checkpoint before rank 0 writes again
  if (rank_ != 0) return true;
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
  if (rank_ != 0) return;
  std::ofstream(cfg_.out + "/metrics.jsonl", std::ios::app) << line << "\n";
}

// A host tensor on the training device. To a GPU through pinned memory and asynchronously: a
// plain copy from pageable memory waits for the GPU to finish its queue, a host
// synchronisation in every step; the pinned buffer is kept until its copy is done.
static Tensor to_device(const Tensor& t, c10::Device device) {
  if (!device.is_cuda() || !t.device().is_cpu()) return t.to(device);
  return t.pin_memory().to(device, t.scalar_type(), /*non_blocking=*/true);
}

Tensor Trainer::train_step(const Batch& b) {
  const int64_t B = b.images.size(0), micro = B / cfg_.grad_accum;  // this rank's rows
  const int64_t T = cfg_.model.num_tokens();
  const int64_t first = rank_ * B;  // global index of this rank's first sample in the batch
  // Deferred masking, except in the last `unmasked_steps` steps (the paper's unmasked
  // fine-tuning, which closes the gap to sampling, where every patch is seen).
  const bool masked = cfg_.mask_ratio > 0 && state_.step < cfg_.steps - cfg_.unmasked_steps;
  if (sync_) sync_->zero_grad();
  else opt_->zero_grad();
  Tensor total;  // float64 (), on the device: the step does not wait for it
  const auto& params = params_;
  // With bf16 weight copies the modules multiply the copies in this step's forward and backward
  // passes; their gradients stay on the copies, or (accumulation, data parallelism) are summed
  // into the float32 weights' .grad as each backward pass completes them.
  const auto targets = copies_ ? copies_->grad_targets(params) : params;
  std::optional<Bf16Weights::Bound> bound;
  if (copies_) bound.emplace(*copies_);
  for (int64_t m = 0; m < cfg_.grad_accum; ++m) {
    // The mean loss over rows [s, s + n) of micro-batch m. The draws are keyed by each
    // sample's global index, so they do not depend on how the rows are sliced.
    auto loss_of_rows = [&](int64_t s, int64_t n) {
      const int64_t row = m * micro + s;
      auto x = downsampled(b.images.narrow(0, row, n));  // (n, C, H, W) as the model sees them
      auto r = draw_samples(cfg_.seed, state_.step, first + row, n, x.sizes().slice(1), T, masked,
                            cfg_.caption_dropout);
      auto dev = [&](const Tensor& t) { return t.defined() ? to_device(t, device_) : t; };
      return sample_loss(dev(x), dev(b.captions.narrow(0, row, n)), dev(r.keep), dev(r.rnd_normal), dev(r.noise),
                         dev(r.mask_noise));
    };
    if (sync_) sync_->begin_backward(/*sync=*/m + 1 == cfg_.grad_accum);
    auto l = parallel_backward(targets, micro, workers_, 1.0 / static_cast<double>(cfg_.grad_accum), loss_of_rows,
                               copies_ ? &params : nullptr) /
             static_cast<double>(cfg_.grad_accum);
    total = total.defined() ? total + l : l;
  }
  if (sync_) {
    sync_->finish();
    // every sample's loss has the same weight (a host read: the ranks' losses meet on the CPU)
    total = at::scalar_tensor(comm_->sum(total.item<double>()) / world_, at::kDouble);
  }
  return total;
}

Tensor Trainer::sample_loss(const Tensor& x, const Tensor& captions, const Tensor& keep, const Tensor& rnd_normal,
                            const Tensor& noise, const Tensor& mask_noise) {
  const int64_t n = x.size(0);
  LossDraws d;
  d.rnd_normal = rnd_normal;
  d.noise = noise;
  if (mask_noise.defined()) d.mask = mask_from_noise(mask_noise, cfg_.model.kept_tokens(cfg_.mask_ratio));
  const auto y = captions.unsqueeze(1) * keep.view({n, 1, 1, 1});  // (n, 1, L, W), dropped captions zero
  AutocastGuard autocast(device_.type(), cfg_.bf16);  // the forward pass only
  return edm_loss(*model_, x, y, d, cfg_.edm);
}

Tensor Trainer::clip_and_step(AdamWDeviceScalars* dev, EMA* ema, int64_t ema_step) {
  // coef, with the fused optimizer and bf16 weight copies or on the CPU: the clipping scale,
  // applied as the AdamW step reads the gradients
  Tensor gnorm, coef;
  const bool deferred = cfg_.fused_optimizer && (copies_ || device_.is_cpu());
  if (cfg_.grad_clip > 0)
    gnorm = deferred ? clip_grad_norm(params_, cfg_.grad_clip, copies_.get(), &coef)
                     : clip_grad_norm(params_, cfg_.grad_clip);
  if (cfg_.fused_optimizer) {
    fused_adamw_step(*opt_, dev, copies_.get(), coef, ema ? &ema->fused(ema_step) : nullptr);
  } else {
    opt_->step();
  }
  return gnorm;
}

// ---- the step as a CUDA graph (train.cuda_graph) ------------------------------------------

// The buffers the recorded step reads (refilled before each replay: this step's batch and its
// draws), what it writes, and the graph. The shapes are one masking phase's.
struct Trainer::StepGraph {
  bool masked = false;
  Tensor images, captions;                   // the batch as the loader gives it, on the device
  Tensor keep, rnd_normal, noise, mask_noise;  // draw_samples' draws for the whole batch
  AdamWDeviceScalars adamw;                  // step count and learning rate, on the device
  Tensor loss, grad_norm;                    // written by each replay
  std::unique_ptr<CudaGraphStep> graph;
};

void Trainer::graph_body() {
  StepGraph& g = *graph_;
  const int64_t B = g.images.size(0), micro = B / cfg_.grad_accum;
  opt_->zero_grad();
  const auto& params = params_;
  const auto targets = copies_ ? copies_->grad_targets(params) : params;
  std::optional<Bf16Weights::Bound> bound;
  if (copies_) bound.emplace(*copies_);
  Tensor total;
  for (int64_t m = 0; m < cfg_.grad_accum; ++m) {
    // As train_step, with every input read from the buffers.
    auto loss_of_rows = [&](int64_t s, int64_t n) {
      const int64_t row = m * micro + s;
      auto rows = [&](const Tensor& t) { return t.defined() ? t.narrow(0, row, n) : t; };
      return sample_loss(rows(g.images), rows(g.captions), rows(g.keep), rows(g.rnd_normal), rows(g.noise),
                         rows(g.mask_noise));
    };
    auto l = parallel_backward(targets, micro, /*workers=*/1, 1.0 / static_cast<double>(cfg_.grad_accum),
                               loss_of_rows, copies_ ? &params : nullptr) /
             static_cast<double>(cfg_.grad_accum);
    total = total.defined() ? total + l : l;
  }
  bound.reset();
  g.grad_norm = clip_and_step(&g.adamw);
  g.loss = total;
}

std::pair<Tensor, Tensor> Trainer::graph_step(const Batch& b, double lr) {
  const bool masked = cfg_.mask_ratio > 0 && state_.step < cfg_.steps - cfg_.unmasked_steps;
  const int64_t B = b.images.size(0), T = cfg_.model.num_tokens();
  if (!graph_ || graph_->masked != masked) {
    graph_.reset();  // the previous phase's graph and its memory go first
    auto g = std::make_unique<StepGraph>();
    const auto on = torch::TensorOptions().device(device_);
    g->masked = masked;
    g->images = at::empty(b.images.sizes(), on.dtype(b.images.scalar_type()));
    g->captions = at::empty(b.captions.sizes(), on.dtype(b.captions.scalar_type()));
    g->keep = at::empty({B}, on.dtype(at::kFloat));
    g->rnd_normal = at::empty({B, 1, 1, 1}, on.dtype(at::kFloat));
    g->noise = at::empty(b.images.sizes(), on.dtype(at::kFloat));
    if (masked) g->mask_noise = at::empty({B, T}, on.dtype(at::kFloat));
    // The device step count continues from the steps taken so far (resume, the earlier phase).
    g->adamw = {at::full({}, static_cast<double>(state_.step), on.dtype(at::kFloat)),
                at::full({}, lr, on.dtype(at::kFloat))};
    graph_ = std::move(g);
    if (rank_ == 0)
      fmt::print("{}recording the training step into a CUDA graph ({} phase) after 2 eager steps\n",
                 ::isatty(::fileno(stdout)) ? "\n" : "", masked ? "masked" : "unmasked");
    graph_->graph = std::make_unique<CudaGraphStep>(device_, [this] { graph_body(); }, /*warmup=*/2);
  }
  StepGraph& g = *graph_;
  MD_CHECK(b.images.sizes() == g.images.sizes() && b.images.scalar_type() == g.images.scalar_type() &&
               b.captions.sizes() == g.captions.sizes() && b.captions.scalar_type() == g.captions.scalar_type(),
           "train.cuda_graph: every batch must have the first one's shapes and dtypes");
  // This step's inputs into the buffers: asynchronous copies from pinned memory, ordered before
  // the replay on the current stream (the pinned blocks stay reserved until the copies are done).
  auto put = [](Tensor& dst, const Tensor& src) {
    dst.copy_(src.is_cpu() ? src.pin_memory() : src, /*non_blocking=*/true);
  };
  const auto r = draw_samples(cfg_.seed, state_.step, /*first=*/0, B, b.images.sizes().slice(1), T, masked,
                              cfg_.caption_dropout);
  put(g.images, b.images);
  put(g.captions, b.captions);
  put(g.keep, r.keep);
  put(g.rnd_normal, r.rnd_normal);
  put(g.noise, r.noise);
  if (masked) put(g.mask_noise, r.mask_noise);
  g.adamw.lr.fill_(lr);
  g.graph->run();
  return {g.loss.clone(), g.grad_norm.defined() ? g.grad_norm.clone() : Tensor()};
}

double Trainer::validation_loss() {
  if (val_.size() == 0) return NAN;
  torch::NoGradGuard ng;
  model_->eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(12345);  // same noise every time
  const int64_t B = std::min<int64_t>(cfg_.batch_size, val_.size());
  const double sd = cfg_.edm.sigma_data;
  // Every (batch, sigma) pair's noise drawn in order first; then the pairs side by side on the
  // CPU workers (one at a time elsewhere), each loss kept in its slot and summed in order.
  struct Pair {
    int64_t batch;
    double sigma;
    Tensor eps;
  };
  std::vector<Pair> pairs;
  for (int64_t i = 0; i < cfg_.val_batches && (i + 1) * B <= val_.size(); ++i)
    for (double s : cfg_.val_sigmas) pairs.push_back({i, s, at::randn(val_.images.narrow(0, i * B, B).sizes(), gen)});
  std::vector<double> losses(pairs.size());
  run_cpu_workers(workers_, static_cast<int64_t>(pairs.size()), [&](int64_t k) {
    const auto& [i, s, eps] = pairs[static_cast<size_t>(k)];
    auto xd = val_.images.narrow(0, i * B, B).to(at::kFloat).to(device_);
    auto yd = val_.captions.narrow(0, i * B, B).to(at::kFloat).unsqueeze(1).to(device_);
    auto sigma = torch::full({B}, s, xd.options());
    auto D = edm_denoise(*model_, xd + s * eps.to(device_), sigma, yd, cfg_.edm);
    const double w = (s * s + sd * sd) / (s * sd * s * sd);
    losses[static_cast<size_t>(k)] = w * (D - xd).pow(2).mean().item<double>();
  });
  double sum = 0;
  const auto count = static_cast<int64_t>(losses.size());
  for (double l : losses) sum += l;
  model_->train();
  return count ? sum / static_cast<double>(count) : NAN;
}

void Trainer::run(int64_t stop_at) {
  const int64_t end = stop_at > 0 ? std::min(stop_at, cfg_.steps) : cfg_.steps;
  auto loader = mds_ ? std::make_unique<BatchLoader>(*mds_, cfg_.batch_size, cfg_.seed, state_.epoch,
                                                    state_.position, 4, rank_, world_)
                : cfg_.stream_window > 0
                    ? std::make_unique<BatchLoader>(train_stream_, cfg_.batch_size, cfg_.seed, state_.epoch,
                                                    state_.position, 4, rank_, world_)
                    : std::make_unique<BatchLoader>(train_, cfg_.batch_size, cfg_.seed, state_.epoch,
                                                    state_.position, 4, rank_, world_);
  // Test only: this rank dies before the given step (fault handling of data-parallel jobs).
  const char* crash_rank = std::getenv("MICRODIT_TEST_CRASH_RANK");
  const char* crash_step = std::getenv("MICRODIT_TEST_CRASH_STEP");
  const int64_t start = state_.step;
  auto t0 = std::chrono::steady_clock::now();
  const bool tty = rank_ == 0 && ::isatty(::fileno(stdout));
  if (start == 0 && rank_ == 0) {
    const double v = validation_loss();
    if (!std::isnan(v)) log_metrics(fmt::format(R"({{"step": 0, "val_loss": {:.6f}}})", v));
  }
  double ema_loss = NAN;
  std::vector<Tensor> pending_loss;  // this step's and earlier unread losses, on the device
  while (state_.step < end) {
    if (crash_rank && crash_step && std::atoi(crash_rank) == rank_ && std::atoll(crash_step) == state_.step) {
      if (std::getenv("MICRODIT_TEST_HANG")) {  // a rank that hangs instead of dying
        fmt::print(stderr, "rank {}: MICRODIT_TEST_HANG: hanging before step {}\n", rank_, state_.step + 1);
        for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
      }
      fmt::print(stderr, "rank {}: MICRODIT_TEST_CRASH_RANK: exiting before step {}\n", rank_, state_.step + 1);
      std::_Exit(3);
    }
    const double lr = learning_rate(cfg_, state_.step);
    if (opt_)
      for (auto& g : opt_->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    Batch b = loader->next();
    // data.downsample: the recorded step reads whole batches; train_step downsamples each
    // worker's slice on that worker (the main thread would do it while the workers wait).
    if (cfg_.cuda_graph) b.images = downsampled(b.images);
    Tensor gnorm;  // global, before clipping; float32 () on the device
    bool ema_in_step = false;
    if (cfg_.cuda_graph) {
      auto [loss, norm] = graph_step(b, lr);
      pending_loss.push_back(loss);
      gnorm = norm;
    } else {
      pending_loss.push_back(train_step(b));
      if (opt_) {
        // On the CPU the fused AdamW pass also moves the EMA (one pass over the weights less).
        ema_in_step = ema_ && cfg_.fused_optimizer && device_.is_cpu();
        gnorm = clip_and_step(nullptr, ema_in_step ? ema_.get() : nullptr, state_.step + 1);
      } else {
        const double n = sync_->sharded_grad_norm();
        gnorm = at::scalar_tensor(n);
        if (cfg_.grad_clip > 0) sync_->sharded_clip(cfg_.grad_clip, n);
        sync_->sharded_step(lr);
      }
    }
    ++state_.step;
    state_.epoch = b.epoch;
    state_.position = b.position;
    if (ema_ && !ema_in_step) ema_->update(*model_, state_.step);

    const bool log_now = state_.step % cfg_.log_every == 0 || state_.step == cfg_.steps;
    const bool val_now = cfg_.val_every > 0 && state_.step % cfg_.val_every == 0;
    const bool sample_now = on_sample && cfg_.sample_every > 0 && state_.step % cfg_.sample_every == 0;
    const bool save_now = state_.step % cfg_.checkpoint_every == 0 || state_.step == end;
    // The losses stay on the device until the step's results are needed on the host: one
    // read every log_every steps, and before anything that uses the weights (validation,
    // samples, a checkpoint), so a diverged run never writes NaN weights.
    if (!(log_now || val_now || sample_now || save_now)) continue;
    const auto losses = at::stack(pending_loss).cpu();  // (k,) float64: the one host read
    const auto* l = losses.const_data_ptr<double>();
    for (int64_t i = 0; i < losses.size(0); ++i) {
      MD_CHECK(std::isfinite(l[i]), "training diverged at step {} (loss {}); lower train.lr",
               state_.step - losses.size(0) + 1 + i, l[i]);
      ema_loss = std::isnan(ema_loss) ? l[i] : 0.9 * ema_loss + 0.1 * l[i];
    }
    const double loss = l[losses.size(0) - 1];
    pending_loss.clear();

    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double ips = (state_.step - start) * cfg_.batch_size / secs;
    const double eta = (cfg_.steps - state_.step) * cfg_.batch_size / std::max(ips, 1e-9);
    if (rank_ == 0 && log_now) {
      log_metrics(fmt::format(R"({{"step": {}, "loss": {:.9g}, "lr": {:.4e}, "grad_norm": {:.9g}, "images_per_s": {:.2f}, "epoch": {}}})",
                              state_.step, loss, lr, gnorm.defined() ? gnorm.item<double>() : NAN, ips, b.epoch));
      fmt::print("{}step {}/{}  loss {:.4f}  lr {:.2e}  {:.1f} img/s  ETA {:02d}:{:02d}{}", tty ? "\r" : "",
                 state_.step, cfg_.steps, ema_loss, lr, ips, static_cast<int>(eta) / 60,
                 static_cast<int>(eta) % 60, tty ? "   " : "\n");
      std::fflush(stdout);
    }
    if (rank_ == 0 && val_now) {
      const double v = validation_loss();
      if (!std::isnan(v)) {
        log_metrics(fmt::format(R"({{"step": {}, "val_loss": {:.6f}}})", state_.step, v));
        fmt::print("{}step {}  validation loss {:.4f}\n", tty ? "\n" : "", state_.step, v);
      }
    }
    if (rank_ == 0 && sample_now) {
      if (ema_) ema_->swap_into(*model_);
      model_->eval();
      on_sample(*model_, state_.step);
      model_->train();
      if (ema_) ema_->swap_into(*model_);
    }
    if (save_now) {
      // Replays step the optimizer on the device only: its host-side step counts first.
      if (cfg_.cuda_graph) set_adamw_step_counts(*opt_, state_.step);
      save_checkpoint();
    }
  }
  if (tty) fmt::print("\n");
  if (rank_ == 0 && on_finish && state_.step == cfg_.steps) on_finish(cfg_.out + "/metrics.jsonl");
}

}  // namespace microdit
