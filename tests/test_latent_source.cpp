// Training on the reference's latent MDS: the source reads latents_<S> and caption_latents
// from several folders as one dataset, the loader shuffles it per epoch and resumes exactly,
// and a trainer run on it records the latent space that sampling then insists on.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>

#include "core/fs.h"
#include "data/latent_source.h"
#include "data/mds.h"
#include "eval/sampling.h"
#include "test_util.h"
#include "train/trainer.h"

using namespace microdit;
using microdit::test_util::error_of;
using microdit::test_util::TempDir;

namespace {

std::string f16_bytes(const at::Tensor& t) {
  auto h = t.to(at::kHalf).contiguous();
  return std::string(static_cast<const char*>(h.data_ptr()), h.numel() * 2);
}

// `n` samples of the reference's schema: latents_64 (4, 8, 8), latents_128 (4, 16, 16),
// caption_latents (1, 5, 16); sample k's latents are filled with base + k.
void write_latent_mds(const std::string& dir, int n, float base) {
  MDSWriterOptions o;
  o.size_limit = 4000;  // several shards
  MDSWriter w(dir, {{"caption", "str"}, {"caption_latents", "bytes"}, {"latents_64", "bytes"},
                    {"latents_128", "bytes"}}, o);
  for (int k = 0; k < n; ++k) {
    const float v = base + k;
    w.write({mds::encode_str("caption " + std::to_string(static_cast<int>(v))),
             f16_bytes(torch::full({1, 5, 16}, -v)), f16_bytes(torch::full({4, 16, 16}, v / 2)),
             f16_bytes(torch::full({4, 8, 8}, v))});
  }
  w.finish();
}

}  // namespace

TEST(LatentSource, ReadsSeveralFoldersAsOneDatasetInOrder) {
  TempDir d;
  write_latent_mds(d.path + "/a", 5, 0);
  write_latent_mds(d.path + "/b", 7, 100);
  LatentMDSSource src({d.path + "/a", d.path + "/b"}, 64, 16);
  EXPECT_EQ(src.size(), 12);
  EXPECT_EQ(src.image_shape(), (std::vector<int64_t>{4, 8, 8}));
  EXPECT_EQ(src.caption_shape(), (std::vector<int64_t>{5, 16}));
  EXPECT_EQ(src.caption(6), "caption 101");
  at::Tensor im, cap;
  src.gather({6, 0, 11}, im, cap);
  ASSERT_EQ(im.sizes(), (std::vector<int64_t>{3, 4, 8, 8}));
  EXPECT_EQ(im.scalar_type(), at::kHalf);
  EXPECT_TRUE(torch::equal(im[0], torch::full({4, 8, 8}, 101.0, at::kHalf)));
  EXPECT_TRUE(torch::equal(im[1], torch::zeros({4, 8, 8}, at::kHalf)));
  EXPECT_TRUE(torch::equal(cap[2], torch::full({5, 16}, -106.0, at::kHalf)));
  // The 128 column is the 512-px stage's.
  LatentMDSSource big({d.path + "/a"}, 128, 16);
  EXPECT_EQ(big.image_shape(), (std::vector<int64_t>{4, 16, 16}));
  // Errors name the problem.
  EXPECT_NE(error_of([&] { LatentMDSSource({d.path + "/a"}, 256, 16); }).find("no column 'latents_256'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { LatentMDSSource({d.path + "/a"}, 64, 7); }).find("caption"), std::string::npos);
  EXPECT_NE(error_of([&] { LatentMDSSource({d.path + "/nope"}, 64, 16); }).find("not an MDS dataset"),
            std::string::npos);
}

TEST(LatentSource, LoaderCoversEachEpochResumesAndSplitsAcrossRanks) {
  TempDir d;
  write_latent_mds(d.path + "/a", 10, 0);
  write_latent_mds(d.path + "/b", 10, 10);
  LatentMDSSource src({d.path + "/a", d.path + "/b"}, 64, 16);
  BatchLoader a(src, 4, 5);
  std::vector<Batch> seen;
  for (int i = 0; i < 8; ++i) seen.push_back(a.next());
  std::vector<int> firsts;  // sample k holds k everywhere in its latents
  for (int i = 0; i < 5; ++i)
    for (int r = 0; r < 4; ++r) firsts.push_back(static_cast<int>(seen[i].images[r][0][0][0].item<float>()));
  std::sort(firsts.begin(), firsts.end());
  for (int k = 0; k < 20; ++k) EXPECT_EQ(firsts[k], k);  // epoch 0: each sample exactly once
  EXPECT_EQ(seen[5].epoch, 1);
  BatchLoader b(src, 4, 5, seen[3].epoch, seen[3].position);
  for (int i = 4; i < 8; ++i) EXPECT_TRUE(torch::equal(b.next().images, seen[i].images)) << i;
  // Two ranks: rank r gets rows [2r, 2r + 2) of the same global batch.
  BatchLoader r0(src, 4, 5, 0, 0, 4, 0, 2), r1(src, 4, 5, 0, 0, 4, 1, 2);
  for (int i = 0; i < 3; ++i) {
    auto x0 = r0.next(), x1 = r1.next();
    EXPECT_TRUE(torch::equal(torch::cat({x0.images, x1.images}), seen[i].images)) << i;
    EXPECT_TRUE(torch::equal(torch::cat({x0.captions, x1.captions}), seen[i].captions)) << i;
  }
}

TEST(LatentSource, TrainerRunsOnLatentMDSAndRecordsTheLatentSpace) {
  TempDir d;
  write_latent_mds(d.path + "/a", 12, 0);
  write_latent_mds(d.path + "/b", 12, 50);
  write_latent_mds(d.path + "/val", 8, 200);
  std::ofstream(d.path + "/a/microdit.json") << R"({"encoder": "test-encoder", "scaling_factor": 0.5})";
  const std::string cfg_path = d.path + "/train.yaml";
  std::ofstream(cfg_path) << "model: {preset: MicroDiT_Pico_2, input_size: 8, in_channels: 4, "
                             "caption_channels: 16, depth: 2, patch_mixer_depth: 1}\n"
                          << "data: {shards: [" << d.path << "/a, " << d.path << "/b], image_size: 64, "
                          << "val_shards: [" << d.path << "/val]}\n"
                          << "train: {steps: 3, batch_size: 4, mask_ratio: 0.75, lr: 1.0e-3}\n"
                          << "run: {out: " << d.path << "/run, log_every: 1, checkpoint_every: 3, "
                             "val_every: 3, val_batches: 1}\n";
  auto cfg = load_train_config(cfg_path, {});
  {
    Trainer t(cfg, c10::kCPU);
    EXPECT_EQ(t.caption_len(), 5);
    EXPECT_EQ(t.encoder(), "test-encoder");
    t.run();
  }
  const std::string ckpt = latest_checkpoint(cfg.out);
  ASSERT_FALSE(ckpt.empty());
  auto sm = load_sampling_model(ckpt, c10::kCPU);
  EXPECT_TRUE(sm.is_latent());
  EXPECT_DOUBLE_EQ(sm.latent_scale, 0.5);
  std::ifstream m(cfg.out + "/metrics.jsonl");
  std::string all((std::istreambuf_iterator<char>(m)), {});
  EXPECT_NE(all.find("val_loss"), std::string::npos);
  // A model whose input does not fit the column is refused with the shapes.
  auto bad = load_train_config(cfg_path, {"model.input_size=4"});
  EXPECT_NE(error_of([&] { Trainer t(bad, c10::kCPU); }).find("latents of shape [4, 8, 8]"), std::string::npos);
}

// The paper's four stage configs name the reference's dataset mix and the stage's column.
TEST(LatentSource, PaperConfigsListTheReferenceMix) {
  const std::string dir = std::string(microdit::test_util::source_dir()) + "/configs/paper/";
  for (const auto& [file, n, size] : std::vector<std::tuple<std::string, size_t, int>>{
           {"stage1_256_mask75.yaml", 5, 256}, {"stage2_256_finetune.yaml", 5, 256},
           {"stage3_512_mask75.yaml", 4, 512}, {"stage4_512_finetune.yaml", 4, 512}}) {
    auto c = load_train_config(dir + file, {});
    EXPECT_EQ(c.shard_dirs.size(), n) << file;
    EXPECT_EQ(c.image_size, size) << file;
    EXPECT_EQ(c.image_size, 8 * c.model.input_size) << file;
    EXPECT_FALSE(c.vae.empty()) << file;
    // The config survives the YAML written into checkpoints.
    EXPECT_NE(train_config_to_yaml(c).find("cc12m"), std::string::npos) << file;
    // As the reference trains: bf16 autocast with Composer's low_precision_layernorm.
    EXPECT_TRUE(c.bf16 && c.low_precision_layernorm) << file;
    EXPECT_NE(train_config_to_yaml(c).find("low_precision_layernorm: true"), std::string::npos) << file;
    // Off, the setting is not written at all, so runs from before it existed are not stale.
    c.low_precision_layernorm = false;
    EXPECT_EQ(train_config_to_yaml(c).find("low_precision_layernorm"), std::string::npos) << file;
    // Without bf16 it would do nothing: the config is refused with a message naming both keys.
    try {
      load_train_config(dir + file, {"train.bf16=false"});
      ADD_FAILURE() << file << ": low_precision_layernorm without bf16 was accepted";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("needs train.bf16: true"), std::string::npos) << e.what();
    }
  }
}

// A run on latent MDS stopped at a checkpoint and resumed repeats the loss curve exactly
// (the data position crosses an epoch: 20 samples, batch 4, 8 steps).
TEST(LatentSource, StoppedAndResumedRunRepeatsTheLossCurve) {
  torch::set_num_threads(1);
  TempDir d;
  write_latent_mds(d.path + "/a", 20, 0);
  const std::string cfg_path = d.path + "/train.yaml";
  std::ofstream(cfg_path) << "model: {preset: MicroDiT_Pico_2, input_size: 8, in_channels: 4, "
                             "caption_channels: 16, depth: 2, patch_mixer_depth: 1}\n"
                          << "data: {shards: " << d.path << "/a, caption_dropout: 0.3}\n"
                          << "train: {steps: 8, batch_size: 4, mask_ratio: 0.5, lr: 1.0e-3}\n"
                          << "run: {log_every: 1, checkpoint_every: 3, val_every: 0}\n";
  {
    Trainer t(load_train_config(cfg_path, {"run.out=" + d.path + "/x"}), c10::kCPU);
    t.run();
  }
  {
    Trainer t(load_train_config(cfg_path, {"run.out=" + d.path + "/y"}), c10::kCPU);
    t.run(/*stop_at=*/6);
  }
  {
    Trainer t(load_train_config(cfg_path, {"run.out=" + d.path + "/y"}), c10::kCPU);
    ASSERT_TRUE(t.resume());
    EXPECT_EQ(t.state().step, 6);
    t.run();
  }
  auto a = test_util::metric_losses(d.path + "/x/metrics.jsonl"), b = test_util::metric_losses(d.path + "/y/metrics.jsonl");
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), 8u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_DOUBLE_EQ(a[i], b[i]) << "step " << i + 1;
}
