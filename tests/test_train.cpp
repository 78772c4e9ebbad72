#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>
#include <map>

#include "core/error.h"
#include "core/fs.h"
#include "core/precision.h"
#include "data/shards.h"
#include "io/safetensors.h"
#include "test_util.h"
#include "train/trainer.h"

using namespace microdit;
using microdit::test_util::error_of;
using microdit::test_util::TempDir;
using microdit::test_util::metric_losses;
using microdit::test_util::metric_values;

namespace {

// 40 random 8x8 RGB samples with 5 x 16 captions; train and val splits.
void make_shards(const std::string& dir) {
  torch::manual_seed(7);
  ShardWriter w(dir, {3, 8, 8}, {5, 16}, "test", "[-1, 1] pixels", 16);
  for (int i = 0; i < 40; ++i)
    w.add(i % 8 == 0 ? "val" : "train", torch::rand({3, 8, 8}) * 2 - 1, torch::randn({5, 16}),
          "caption " + std::to_string(i));
  w.finish();
}

std::string write_config(const std::string& dir, const std::string& shards) {
  const std::string path = dir + "/train.yaml";
  std::ofstream(path) << "model: {preset: MicroDiT_Pico_2, input_size: 8, in_channels: 3, "
                         "caption_channels: 16, depth: 2, patch_mixer_depth: 2}\n"
                      << "data: {shards: " << shards << ", caption_dropout: 0.2}\n"
                      << "edm: {sigma_data: 0.5, P_mean: -1.2, P_std: 1.2}\n"
                      << "train: {steps: 6, batch_size: 8, grad_accum: 2, mask_ratio: 0.5, unmasked_steps: 2, "
                         "lr: 1.0e-3, warmup_steps: 2, grad_clip: 1.0, ema_decay: 0.9, ema_start: 2}\n"
                      << "run: {log_every: 1, checkpoint_every: 3, keep_last: 2, val_every: 3, "
                         "val_batches: 1}\n";
  return path;
}

// A run folder with the shards above and train.yaml, on one thread (deterministic kernels, for
// exact comparisons between runs).
struct TinyRun {
  TempDir dir;
  std::string shards = dir.path + "/shards", cfg_path;
  TinyRun() {
    torch::set_num_threads(1);
    make_shards(shards);
    cfg_path = write_config(dir.path, shards);
  }
};

}  // namespace

TEST(Train, ShardsRoundTripAndBatchesResumeExactly) {
  TempDir dir;
  make_shards(dir.path + "/shards");
  auto train = load_split(dir.path + "/shards", "train");
  EXPECT_EQ(train.size(), 35);
  EXPECT_EQ(train.texts[0], "caption 1");
  BatchLoader a(train, 8, 3);
  std::vector<Batch> seen;
  for (int i = 0; i < 6; ++i) seen.push_back(a.next());  // crosses an epoch boundary (35/8)
  BatchLoader b(train, 8, 3, seen[2].epoch, seen[2].position);
  for (int i = 3; i < 6; ++i) EXPECT_TRUE(torch::equal(b.next().images, seen[i].images)) << i;
  EXPECT_EQ(seen[5].epoch, 1);
}

// Streaming: each epoch yields every sample at most once (one partial batch dropped), the
// shard order changes between epochs, a resumed loader repeats the batches, and a shard that
// goes bad on disk is an Error from next(), not a crash of the loader thread.
TEST(Train, StreamedBatchesCoverTheSplitAndResumeExactly) {
  TempDir dir;
  const std::string shards = dir.path + "/shards";
  make_shards(shards);
  const auto stream = open_stream(shards, "train", 2);
  ASSERT_EQ(stream.counts, (std::vector<int64_t>{16, 16, 3}));  // from index.json
  EXPECT_EQ(stream.size(), 35);
  const auto all = load_split(shards, "train");
  auto key = [](const Tensor& im) { return im.flatten(1).select(1, 0); };  // first pixel: unique
  BatchLoader a(stream, 5, 3);
  std::vector<Batch> seen;
  for (int i = 0; i < 14; ++i) seen.push_back(a.next());  // two epochs of 7 batches
  for (int e = 0; e < 2; ++e) {
    std::vector<Tensor> ims;
    for (int i = 0; i < 7; ++i) ims.push_back(seen[e * 7 + i].images);
    auto got = std::get<0>(key(at::cat(ims)).sort());
    auto want = std::get<0>(key(all.images.to(at::kFloat)).sort());
    EXPECT_TRUE(torch::equal(got, want)) << "epoch " << e << " is not a permutation of the split";
    EXPECT_EQ(seen[e * 7 + 6].epoch, e);
  }
  EXPECT_FALSE(torch::equal(seen[0].images, seen[7].images));
  BatchLoader b(stream, 5, 3, seen[4].epoch, seen[4].position);
  for (int i = 5; i < 14; ++i) EXPECT_TRUE(torch::equal(b.next().images, seen[i].images)) << i;

  std::ofstream(shards + "/train-00001.safetensors", std::ios::trunc) << "broken";
  BatchLoader c(stream, 5, 3, 0, 0, 1);
  EXPECT_NE(error_of([&] {
              for (int i = 0; i < 14; ++i) c.next();
            }).find("train-00001.safetensors"),
            std::string::npos);
}

TEST(Train, CorruptShardIndexIsAClearError) {
  TempDir dir;
  make_shards(dir.path + "/shards");
  std::ofstream(dir.path + "/shards/index.json") << "{\"format\": \"microdit-shards\"";
  try {
    load_split(dir.path + "/shards", "train");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("corrupt index"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_split(dir.path + "/nowhere", "train"), Error);
}

TEST(Train, ScheduleWarmsUpThenDecays) {
  TrainConfig c;
  c.lr = 1.0, c.steps = 100, c.warmup_steps = 10, c.min_lr_ratio = 0.25;
  EXPECT_DOUBLE_EQ(learning_rate(c, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(c, 9), 1.0);
  EXPECT_NEAR(learning_rate(c, 10), 1.0, 1e-12);
  EXPECT_NEAR(learning_rate(c, 100), 0.25, 1e-12);
  c.schedule = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(c, 50), 1.0);
}

TEST(Train, ConfigOverridesAndUnknownKeys) {
  TempDir dir;
  const auto cfg = write_config(dir.path, dir.path + "/shards");
  auto c = load_train_config(cfg, {"train.steps=12", "run.out=" + dir.path + "/x"});
  EXPECT_EQ(c.steps, 12);
  EXPECT_EQ(c.grad_accum, 2);
  EXPECT_EQ(c.model.dim, 128);
  try {
    load_train_config(cfg, {"train.stepz=3"});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown key 'train.stepz'"), std::string::npos);
  }
  try {
    load_train_config(cfg, {"train.steps=many"});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'train.steps' must be an integer"), std::string::npos);
  }
  EXPECT_NE(error_of([&] { load_train_config(cfg, {"train.unmasked_steps=7"}); })
                .find("train.unmasked_steps must be in [0, train.steps]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_train_config(cfg, {"train.cpu_workers=-2"}); }).find("train.cpu_workers must be >= 0"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_train_config(cfg, {"train.activation_checkpointing=sometimes"}); })
                .find("'train.activation_checkpointing' must be true or false"),
            std::string::npos);
  c = load_train_config(cfg, {"train.cpu_workers=3", "train.activation_checkpointing=true", "train.tf32=true"});
  EXPECT_EQ(c.cpu_workers, 3);
  EXPECT_TRUE(c.activation_checkpointing);
  EXPECT_TRUE(c.tf32);
}

// train.bf16: auto: undecided in the parsed config (and so written), decided for the run's
// device by resolve_bf16 (bf16 on CUDA and on CPUs that multiply bf16), once.
TEST(Train, Bf16AutoIsDecidedForTheDevice) {
  TempDir dir;
  const auto cfg = write_config(dir.path, dir.path + "/shards");
  auto c = load_train_config(cfg, {"train.bf16=auto"});
  EXPECT_TRUE(c.bf16_auto);
  EXPECT_NE(train_config_to_yaml(c).find("bf16: auto"), std::string::npos);
  auto gpu = c;
  EXPECT_NE(resolve_bf16(gpu, /*cuda=*/true).find("bf16 autocast (CUDA)"), std::string::npos);
  EXPECT_TRUE(gpu.bf16);
  EXPECT_FALSE(gpu.bf16_auto);
  EXPECT_NE(train_config_to_yaml(gpu).find("bf16: true"), std::string::npos);
  EXPECT_EQ(resolve_bf16(gpu, true), "") << "decided once";
  const std::string why = resolve_bf16(c, /*cuda=*/false);
  EXPECT_EQ(c.bf16, bf16_native(false));
  EXPECT_NE(why.find(c.bf16 ? "AVX-512 BF16 or AMX" : "-> float32"), std::string::npos) << why;
  auto fixed = load_train_config(cfg, {"train.bf16=true"});
  EXPECT_EQ(resolve_bf16(fixed, false), "");
  EXPECT_TRUE(fixed.bf16);
  EXPECT_NE(error_of([&] { load_train_config(cfg, {"train.bf16=maybe"}); }).find("'train.bf16' must be true, false or auto"),
            std::string::npos);
  // What needs bf16 is checked once auto is decided.
  auto lpln = load_train_config(cfg, {"train.bf16=auto", "train.low_precision_layernorm=true"});
  const auto e = error_of([&] { resolve_bf16(lpln, false); });
  EXPECT_EQ(e.empty(), bf16_native(false)) << e;
  if (!e.empty()) {
    EXPECT_NE(e.find("set train.bf16: true to force it"), std::string::npos) << e;
  }
}

class StoppedAndResumed : public ::testing::TestWithParam<std::string> {};

// In memory and streamed (data.stream_window=1).
TEST_P(StoppedAndResumed, RepeatsTheLossCurve) {
  TinyRun r;  // 8 x 8 images
  const auto& dir = r.dir;
  const auto& cfg_path = r.cfg_path;
  const std::string window = "data.stream_window=" + GetParam();

  auto straight = load_train_config(cfg_path, {"run.out=" + dir.path + "/a", window});
  {
    Trainer t(straight, torch::kCPU);
    t.run();
  }
  // Same run stopped after step 3 (a checkpoint step), then resumed in a new trainer; steps 5
  // and 6 are the unmasked tail (train.unmasked_steps = 2).
  auto first = load_train_config(cfg_path, {"run.out=" + dir.path + "/b", window});
  {
    Trainer t(first, torch::kCPU);
    t.run(/*stop_at=*/3);
  }
  auto second = load_train_config(cfg_path, {"run.out=" + dir.path + "/b", window});
  {
    Trainer t(second, torch::kCPU);
    ASSERT_TRUE(t.resume());
    EXPECT_EQ(t.state().step, 3);
    t.run();
  }
  auto la = metric_losses(dir.path + "/a/metrics.jsonl"), lb = metric_losses(dir.path + "/b/metrics.jsonl");
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u);
  for (size_t i = 0; i < la.size(); ++i) EXPECT_DOUBLE_EQ(la[i], lb[i]) << "step " << i + 1;
  // keep_last = 2: only the two newest checkpoints remain.
  EXPECT_EQ(list_dir(dir.path + "/a/checkpoints").size(), 2u);
  EXPECT_EQ(latest_checkpoint(dir.path + "/a"), dir.path + "/a/checkpoints/step-0000006.safetensors");
}
// bf16 weight copies (train.bf16_weights, train/bf16_weights.h) in the trainer: the first loss
// as without them, to the bit (same bf16 products, same gradients); a stopped and resumed run
// repeats the straight one (the copies are written again from the loaded weights).
TEST(Train, Bf16WeightCopiesTrainAndResume) {
  TinyRun r;
  const auto& dir = r.dir;
  const std::vector<std::string> bf16 = {"train.bf16=true", "train.bf16_weights=on", "train.grad_accum=1"};
  auto with = [&](const std::string& out, std::vector<std::string> more) {
    more.push_back("run.out=" + dir.path + "/" + out);
    return load_train_config(r.cfg_path, more);
  };
  {
    Trainer t(with("plain", {"train.bf16=true", "train.bf16_weights=off", "train.grad_accum=1"}), torch::kCPU);
    EXPECT_EQ(t.precision_summary(), "");
    t.run();
  }
  {
    Trainer t(with("a", bf16), torch::kCPU);
    EXPECT_NE(t.precision_summary().find("bf16 weight copies"), std::string::npos);
    t.run();
  }
  {
    Trainer t(with("b", bf16), torch::kCPU);
    t.run(/*stop_at=*/3);
  }
  {
    Trainer t(with("b", bf16), torch::kCPU);
    ASSERT_TRUE(t.resume());
    t.run();
  }
  auto plain = metric_losses(dir.path + "/plain/metrics.jsonl");
  auto la = metric_losses(dir.path + "/a/metrics.jsonl"), lb = metric_losses(dir.path + "/b/metrics.jsonl");
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u);
  ASSERT_EQ(plain.size(), 6u);
  EXPECT_DOUBLE_EQ(plain[0], la[0]);
  for (size_t i = 0; i < la.size(); ++i) {
    EXPECT_DOUBLE_EQ(la[i], lb[i]) << "step " << i + 1;
    EXPECT_NEAR(la[i], plain[i], 1e-2 * std::abs(plain[i])) << "step " << i + 1;
  }
  // With gradient accumulation the copies' gradients are summed in float32 on the weights: the
  // first loss as without copies, to the bit, the first step's gradient norm (the sums of the
  // two passes) to float rounding of the norm, and the curves close (the AdamW kernels differ).
  {
    Trainer t(with("accum_plain", {"train.bf16=true", "train.bf16_weights=off", "train.grad_accum=2"}), torch::kCPU);
    t.run();
  }
  {
    Trainer t(with("accum", {"train.bf16=true", "train.bf16_weights=on", "train.grad_accum=2"}), torch::kCPU);
    EXPECT_NE(t.precision_summary().find("their gradients summed in float32"), std::string::npos);
    t.run();
  }
  const auto ap = metric_losses(dir.path + "/accum_plain/metrics.jsonl"), ac = metric_losses(dir.path + "/accum/metrics.jsonl");
  ASSERT_EQ(ap.size(), 6u);
  ASSERT_EQ(ac.size(), 6u);
  EXPECT_DOUBLE_EQ(ap[0], ac[0]);
  for (size_t i = 0; i < ac.size(); ++i) EXPECT_NEAR(ac[i], ap[i], 1e-2 * std::abs(ap[i])) << "step " << i + 1;
  const auto gp = metric_values(dir.path + "/accum_plain/metrics.jsonl", "grad_norm"),
             gc = metric_values(dir.path + "/accum/metrics.jsonl", "grad_norm");
  ASSERT_EQ(gp.size(), 6u);
  ASSERT_EQ(gc.size(), 6u);
  EXPECT_NEAR(gc[0], gp[0], 1e-6 * gp[0]) << "the first step's gradient norm";
  // A bad value: a one-line error (the sharded optimizer's is in Dist.TwoGlooWorkersReproduceOneProcess).
  EXPECT_NE(error_of([&] { with("c", {"train.bf16_weights=always"}); }).find("train.bf16_weights must be auto, on or off"),
            std::string::npos);
}

TEST(Train, ResumingUnderOtherSettingsWarns) {
  TinyRun r;  // 8 x 8 images
  const auto& dir = r.dir;
  const auto& cfg_path = r.cfg_path;
  const std::string out = "run.out=" + dir.path + "/r";
  {
    Trainer t(load_train_config(cfg_path, {out}), torch::kCPU);
    t.run(/*stop_at=*/3);
  }
  auto resumed_output = [&](const std::vector<std::string>& overrides) {
    Trainer t(load_train_config(cfg_path, overrides), torch::kCPU);
    testing::internal::CaptureStdout();
    const bool ok = t.resume();
    const auto text = testing::internal::GetCapturedStdout();
    EXPECT_TRUE(ok);
    return text;
  };
  EXPECT_EQ(resumed_output({out}).find("warning"), std::string::npos) << "same settings: no warning";
  const auto text = resumed_output({out, "train.lr=0.5", "train.bf16=true"});
  EXPECT_NE(text.find("warning:"), std::string::npos) << text;
  EXPECT_NE(text.find("train.lr"), std::string::npos) << text;
  EXPECT_NE(text.find("train.bf16"), std::string::npos) << text;
  EXPECT_EQ(text.find("train.steps"), std::string::npos) << text;
  EXPECT_EQ(changed_settings("a: {b: 1, c: [1, 2]}", "a: {b: 1, c: [1, 3], d: x}"),
            (std::vector<std::string>{"a.c", "a.d"}));
  // What scripts/run.sh asks before it skips or resumes a stage.
  EXPECT_TRUE(settings_changed_since_checkpoint(load_train_config(cfg_path, {out})).empty());
  EXPECT_EQ(settings_changed_since_checkpoint(load_train_config(cfg_path, {out, "edm.P_mean=1.2"})),
            (std::vector<std::string>{"edm.P_mean"}));
  EXPECT_TRUE(settings_changed_since_checkpoint(
                  load_train_config(cfg_path, {"run.out=" + dir.path + "/none", "edm.P_mean=1.2"}))
                  .empty())
      << "no checkpoint: nothing to compare";
}

// A stage starts from our own checkpoint's raw weights (model.*) or its EMA (ema.*), buffers
// such as mask_token included; a foreign-style file (bare names) loads as it is.
TEST(Train, StageStartsFromRawOrEMAWeights) {
  TinyRun r;  // 8 x 8 images
  const auto& dir = r.dir;
  const auto& cfg_path = r.cfg_path;
  {
    Trainer t(load_train_config(cfg_path, {"run.out=" + dir.path + "/s1"}), torch::kCPU);
    t.run();
  }
  const std::string ckpt = latest_checkpoint(dir.path + "/s1");
  std::map<std::string, torch::Tensor> file;
  for (auto& [k, v] : read_safetensors(ckpt).tensors) file[k] = v;
  const std::string w = "x_embedder.proj.weight";
  ASSERT_TRUE(file.count("model." + w) && file.count("ema." + w) && !file.count("ema.mask_token"));
  ASSERT_FALSE(torch::equal(file["model." + w], file["ema." + w])) << "EMA must differ for the test to mean anything";
  auto started = [&](const std::vector<std::string>& extra) {
    std::vector<std::string> o{"run.out=" + dir.path + "/s2", "stage.init_from=" + ckpt, "model.pos_interp_scale=2"};
    o.insert(o.end(), extra.begin(), extra.end());
    Trainer t(load_train_config(cfg_path, o), torch::kCPU);
    std::map<std::string, torch::Tensor> m;
    for (const auto& p : t.model().named_parameters()) m[p.key()] = p.value().detach().clone();
    for (const auto& b : t.model().named_buffers()) m[b.key()] = b.value().clone();
    return m;
  };
  file["model.mask_token"].fill_(0.25);  // a buffer only model.* holds: it must be loaded
  NamedTensors all;
  for (auto& [k, v] : file) all.emplace_back(k, v);
  write_safetensors(ckpt, all);
  auto raw = started({});
  EXPECT_TRUE(torch::equal(raw[w], file["model." + w]));
  EXPECT_TRUE(torch::allclose(raw["mask_token"], torch::full_like(file["model.mask_token"], 0.25)));
  auto ema = started({"stage.init_weights=ema"});
  EXPECT_TRUE(torch::equal(ema[w], file["ema." + w]));
  EXPECT_TRUE(torch::allclose(ema["mask_token"], torch::full_like(file["model.mask_token"], 0.25)));
  EXPECT_FALSE(torch::equal(ema["pos_embed"], file["model.pos_embed"])) << "the table is rebuilt, never loaded";
  // Bare names, as a converted reference checkpoint has them.
  NamedTensors bare;
  for (auto& [k, v] : file)
    if (k.rfind("model.", 0) == 0) bare.emplace_back(k.substr(6), v);
  write_safetensors(dir.path + "/bare.safetensors", bare);
  auto from_bare = started({"stage.init_from=" + dir.path + "/bare.safetensors"});
  EXPECT_TRUE(torch::equal(from_bare[w], file["model." + w]));
  // No EMA in the file, or an unknown choice: one-line errors.
  NamedTensors no_ema;
  for (auto& [k, v] : file)
    if (k.rfind("model.", 0) == 0) no_ema.emplace_back(k, v);
  write_safetensors(dir.path + "/no_ema.safetensors", no_ema);
  EXPECT_NE(error_of([&] { started({"stage.init_from=" + dir.path + "/no_ema.safetensors", "stage.init_weights=ema"}); })
                .find("stage.init_weights is ema but the checkpoint holds no EMA weights"),
            std::string::npos);
  EXPECT_NE(error_of([&] { started({"stage.init_from=" + dir.path + "/none.safetensors"}); })
                .find("none.safetensors: no such file (train the earlier stage first)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_train_config(cfg_path, {"stage.init_weights=best"}); })
                .find("stage.init_weights must be raw or ema, got 'best'"),
            std::string::npos);
}

// A step's loss stays on the device until it is logged (or a checkpoint, validation or samples
// need the host): reading it every step or every 4th changes nothing in the run.
TEST(Train, LossesReadOnlyWhenLoggedGiveTheSameRun) {
  TinyRun r;  // 8 x 8 images
  const auto& dir = r.dir;
  const auto& cfg_path = r.cfg_path;
  for (const char* run : {"every", "fourth"}) {
    Trainer t(load_train_config(cfg_path, {"run.out=" + dir.path + "/" + run, "train.steps=8", "train.unmasked_steps=0",
                                           std::string("run.log_every=") + (run == std::string("every") ? "1" : "4"),
                                           "run.checkpoint_every=8", "run.val_every=0"}),
              torch::kCPU);
    t.run();
  }
  auto every = metric_losses(dir.path + "/every/metrics.jsonl"), fourth = metric_losses(dir.path + "/fourth/metrics.jsonl");
  ASSERT_EQ(every.size(), 8u);
  ASSERT_EQ(fourth.size(), 2u);
  EXPECT_DOUBLE_EQ(fourth[0], every[3]);
  EXPECT_DOUBLE_EQ(fourth[1], every[7]);
  auto a = read_safetensors(dir.path + "/every/checkpoints/step-0000008.safetensors").tensors;
  auto b = read_safetensors(dir.path + "/fourth/checkpoints/step-0000008.safetensors").tensors;
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  // A diverging run stops at the step that diverged, before it writes a checkpoint, even when
  // the loss is read only every 4th step.
  const auto err = error_of([&] {
    Trainer t(load_train_config(cfg_path, {"run.out=" + dir.path + "/nan", "train.steps=8", "train.unmasked_steps=0",
                                           "run.log_every=4", "run.checkpoint_every=8", "run.val_every=0",
                                           "train.lr=1.0e30", "train.warmup_steps=0", "train.grad_clip=0"}),
              torch::kCPU);
    t.run();
  });
  const auto at = err.find("training diverged at step ");
  ASSERT_NE(at, std::string::npos) << err;
  // lr 1e30 wrecks the weights in the first update, so step 2's loss is the first non-finite
  // one; it is found at the read after step 4 and named by its own step.
  EXPECT_EQ(std::stoi(err.substr(at + 26)), 2) << err;
  EXPECT_TRUE(list_dir(dir.path + "/nan/checkpoints").empty());
}

// data.downsample: a lower-resolution stage trained from the same pixel shards.
TEST(Train, DownsampledStageTrainsFromTheSameShards) {
  TinyRun r;  // 8 x 8 images
  const auto& dir = r.dir;
  const auto& cfg_path = r.cfg_path;
  const std::string out = "run.out=" + dir.path + "/d";
  EXPECT_NE(error_of([&] { Trainer(load_train_config(cfg_path, {out, "model.input_size=4"}), torch::kCPU); })
                .find("(data.downsample 2 trains on them at 4 x 4)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { Trainer(load_train_config(cfg_path, {out, "data.downsample=2"}), torch::kCPU); })
                .find("after data.downsample 2 (stored 16 x 16)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_train_config(cfg_path, {"data.downsample=0"}); }).find("data.downsample must be >= 1"),
            std::string::npos);
  Trainer t(load_train_config(cfg_path, {out, "model.input_size=4", "data.downsample=2"}), torch::kCPU);
  t.run();
  EXPECT_EQ(t.state().step, 6);
  EXPECT_TRUE(std::isfinite(t.validation_loss()));
  EXPECT_EQ(metric_losses(dir.path + "/d/metrics.jsonl").size(), 6u);
}

// The validation loss takes its (batch, sigma) pairs side by side on the CPU workers: the
// same loss as one at a time, from the same weights.
TEST(Train, ValidationOnWorkersEqualsOneAtATime) {
  TinyRun r;
  const std::string out = "run.out=" + r.dir.path + "/v";
  const std::vector<std::string> val = {out, "run.val_batches=2", "run.val_sigmas=[0.3, 1.0, 3.0]"};
  auto with = [&](const char* workers) {
    auto o = val;
    o.push_back(std::string("train.cpu_workers=") + workers);
    return o;
  };
  torch::set_num_threads(2);
  Trainer one(load_train_config(r.cfg_path, with("1")), torch::kCPU), two(load_train_config(r.cfg_path, with("2")), torch::kCPU);
  const double a = one.validation_loss(), b = two.validation_loss();
  torch::set_num_threads(1);
  ASSERT_TRUE(std::isfinite(a));
  EXPECT_NEAR(a, b, 1e-6 * std::abs(a));
}

INSTANTIATE_TEST_SUITE_P(Train, StoppedAndResumed, ::testing::Values("0", "1"),
                         [](const auto& info) { return info.param == "0" ? std::string("InMemory") : std::string("Streamed"); });

TEST(Train, CudaGraphStepsEqualEagerSteps) {
  // train.cuda_graph: one-line errors where it cannot run, and on a GPU the recorded step
  // trains as the eager one: the same losses and gradient norms step by step, through the
  // switch from the masked to the unmasked phase (a second graph), gradient accumulation,
  // clipping, bf16 weight copies, and a stop and resume (the optimizer's step counts).
  TinyRun r;
  const auto& dir = r.dir;
  auto with = [&](const std::string& out, std::vector<std::string> more) {
    more.push_back("run.out=" + dir.path + "/" + out);
    return load_train_config(r.cfg_path, more);
  };
  EXPECT_NE(error_of([&] { Trainer t(with("cpu", {"train.cuda_graph=true"}), torch::kCPU); })
                .find("train.cuda_graph needs a CUDA device"),
            std::string::npos);
  EXPECT_NE(error_of([&] { with("ckpt", {"train.cuda_graph=true", "train.activation_checkpointing=true"}); })
                .find("train.cuda_graph does not record train.activation_checkpointing"),
            std::string::npos);
  EXPECT_NE(error_of([&] { with("plain", {"train.cuda_graph=true", "train.fused_optimizer=false"}); })
                .find("needs train.fused_optimizer: true"),
            std::string::npos);
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device cuda(torch::kCUDA, 0);
  for (const bool bf16 : {false, true}) {
    SCOPED_TRACE(bf16 ? "bf16, weight copies" : "float32");
    const std::string tag = bf16 ? "_bf16" : "_f32";
    std::vector<std::string> base = {"train.steps=8", "train.unmasked_steps=3"};
    if (bf16) base.insert(base.end(), {"train.bf16=true", "train.bf16_weights=on"});
    auto graph = base;
    graph.push_back("train.cuda_graph=true");
    {
      Trainer t(with("eager" + tag, base), cuda);
      t.run();
    }
    {
      Trainer t(with("graph" + tag, graph), cuda);
      t.run(/*stop_at=*/4);
    }
    {
      Trainer t(with("graph" + tag, graph), cuda);
      ASSERT_TRUE(t.resume());
      t.run();
    }
    const auto le = metric_losses(dir.path + "/eager" + tag + "/metrics.jsonl"),
               lg = metric_losses(dir.path + "/graph" + tag + "/metrics.jsonl");
    const auto ge = metric_values(dir.path + "/eager" + tag + "/metrics.jsonl", "grad_norm"),
               gg = metric_values(dir.path + "/graph" + tag + "/metrics.jsonl", "grad_norm");
    ASSERT_EQ(le.size(), 8u);
    ASSERT_EQ(lg.size(), 8u);
    ASSERT_EQ(gg.size(), 8u);
    // The same kernels in the same order; only the atomics of some column sums may add in another order.
    for (size_t i = 0; i < le.size(); ++i) {
      EXPECT_NEAR(lg[i], le[i], 1e-4 * std::abs(le[i])) << "step " << i + 1;
      EXPECT_NEAR(gg[i], ge[i], 1e-3 * std::abs(ge[i])) << "step " << i + 1;
    }
  }
}
