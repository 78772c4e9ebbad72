// microdit prepare: images + captions -> shards of (pixels in [-1, 1], caption embeddings from
// the frozen text encoder), so that training touches neither pixels nor text.
// With --images it writes the reference's latent MDS instead (src/data/prepare_latents.h):
// VAE latents per size + caption embeddings, resumable, bad items skipped and reported.
#include <nlohmann/json.hpp>

#include <fstream>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/progress.h"
#include "data/emoji.h"
#include "data/image.h"
#include "data/prepare_latents.h"
#include "data/shards.h"
#include "text/encoder.h"

namespace microdit::cli {

namespace {

struct PrepareOptions {
  RuntimeOptions rt;
  std::string dataset, out, encoder = "minilm";
  int caption_len = 0;  // 0: the longest caption's token count, so none is truncated
  int batch = 0, shard_size = 1024;  // batch 0: 64 (pixels) or 16 (latents)
  // Latent mode (--images).
  std::string images, vae, caption_key, compression = "none";
  std::vector<int> sizes{256, 512};
  int workers = 0, min_size = 0;
  uint64_t seed = 2024;
  int64_t size_limit = int64_t{1} << 28;
};

void run_latents(const PrepareOptions& o) {
  set_threads(o.rt.threads);
  PrepareLatentsOptions p;
  p.source = o.images;
  p.vae = o.vae;
  p.encoder = o.encoder;
  p.out = o.out;
  p.sizes = o.sizes;
  p.batch = o.batch > 0 ? o.batch : 16;
  p.workers = o.workers;
  p.min_size = o.min_size;
  p.caption_len = o.caption_len > 0 ? o.caption_len : 77;
  p.seed = o.seed;
  p.size_limit = o.size_limit;
  p.compression = o.compression;
  p.caption_key = o.caption_key;
  p.device = o.rt.device;
  const auto r = prepare_latents(p);
  fmt::print("{}\n", r.summary);
  if (!r.already_done) fmt::print("wrote {}/index.json\n", o.out);
}

void run(const PrepareOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  const auto items = read_emoji_rows(o.dataset, /*require_subgroup=*/false);
  std::vector<std::string> texts;
  for (const auto& it : items) texts.push_back(it.caption);

  // Caption length: the longest tokenized caption, so no caption is truncated.
  int64_t L = o.caption_len;
  if (L <= 0) {
    auto probe = text::make_text_encoder(o.encoder, {256, c10::kCPU});
    auto ids = probe->tokenize(texts);  // (N, 256), pad id 0
    L = ids.ne(0).sum(1).max().item<int64_t>();
    MD_CHECK(L < 256, "a caption is longer than 255 tokens");
  }
  auto enc = text::make_text_encoder(o.encoder, {L, device});
  fmt::print("encoder: {}\ncaption length: {} tokens\n", enc->describe(), L);

  const Image first = read_png(o.dataset + "/" + items[0].file);
  ShardWriter writer(o.out, {3, first.height, first.width}, {L, enc->width()}, o.encoder,
                     "[-1, 1] pixels", o.shard_size);
  ProgressBar bar("prepare", static_cast<int64_t>(items.size()), "img");
  const size_t batch_size = o.batch > 0 ? o.batch : 64;
  for (size_t s = 0; s < items.size(); s += batch_size) {
    const size_t n = std::min<size_t>(batch_size, items.size() - s);
    std::vector<std::string> batch(texts.begin() + s, texts.begin() + s + n);
    auto emb = enc->encode(batch);  // (n, L, W)
    for (size_t i = 0; i < n; ++i) {
      const auto& it = items[s + i];
      const Image img = read_png(o.dataset + "/" + it.file);
      MD_CHECK(img.width == first.width && img.height == first.height,
               "{}/{}: {}x{} image among {}x{} ones", o.dataset, it.file, img.width, img.height,
               first.width, first.height);
      writer.add(it.split, image_to_tensor(img), emb[i], it.caption);
    }
    bar.advance(n);
  }
  bar.finish();
  const auto idx = writer.finish();
  for (const auto& [split, count] : idx.counts)
    fmt::print("{}: {} samples in {} shard(s)\n", split, count, idx.shards.at(split).size());
  fmt::print("wrote {}/index.json\n", o.out);
}

}  // namespace

void register_prepare(CLI::App& app) {
  auto o = std::make_shared<PrepareOptions>();
  auto* cmd = app.add_subcommand(
      "prepare",
      "precompute training shards from images and captions: pixel shards (--dataset) or the "
      "reference's latent MDS (--images, --vae)");
  cmd->add_option("--dataset", o->dataset, "pixel mode: folder with captions.jsonl and images");
  cmd->add_option("--images", o->images,
                  "latent mode: a folder of images with same-name .txt captions (or captions.jsonl), "
                  "webdataset .tar file(s) (a file, a folder or a glob), or an MDS folder with an "
                  "image and a caption column");
  cmd->add_option("--out", o->out, "output folder for the shards")->required();
  cmd->add_option("--encoder", o->encoder,
                  "frozen text encoder (see encode-text; latent mode: minilm or clip-vit-h-14:FILE)")
      ->capture_default_str();
  cmd->add_option("--caption-len", o->caption_len,
                  "caption tokens (0: pixel mode the longest caption, latent mode 77)")->capture_default_str();
  cmd->add_option("--batch", o->batch, "images/captions per encoder batch (0: 64 pixels, 16 latents)")
      ->capture_default_str();
  cmd->add_option("--shard-size", o->shard_size, "pixel mode: samples per shard")->capture_default_str();
  cmd->add_option("--vae", o->vae, "latent mode: VAE (diffusers folder or .safetensors file)");
  cmd->add_option("--sizes", o->sizes, "latent mode: image sizes, one latents_<S> column each")
      ->delimiter(',')->capture_default_str();
  cmd->add_option("--workers", o->workers, "latent mode: image decoding threads (0: up to 8 with CUDA; on the CPU the cores --threads leaves, at least 1)")
      ->capture_default_str();
  cmd->add_option("--min-size", o->min_size,
                  "latent mode: skip images whose shorter side is smaller (0: keep all, as the reference)")
      ->capture_default_str();
  cmd->add_option("--caption-key", o->caption_key,
                  "latent mode: caption column (MDS) or JSON field (webdataset .json); default caption")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "latent mode: posterior noise seed (item i uses seed + i)")
      ->capture_default_str();
  cmd->add_option("--size-limit", o->size_limit, "latent mode: MDS shard size limit in bytes")
      ->capture_default_str();
  cmd->add_option("--compression", o->compression, "latent mode: none, zstd or zstd:L")->capture_default_str();
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o, cmd] {
    const bool latent = !o->images.empty();
    MD_CHECK(latent != !o->dataset.empty(), "prepare: give either --dataset (pixel shards) or --images "
             "(latent MDS)");
    if (latent) {
      MD_CHECK(cmd->count("--shard-size") == 0, "prepare: --shard-size is for --dataset; latent shards "
               "roll over at --size-limit bytes");
      MD_CHECK(!o->vae.empty(), "prepare --images needs --vae (a diffusers folder or a .safetensors file)");
      run_latents(*o);
    } else {
      for (const char* opt : {"--vae", "--sizes", "--workers", "--min-size", "--caption-key", "--seed",
                              "--size-limit", "--compression"})
        MD_CHECK(cmd->count(opt) == 0, "prepare: {} is for --images (latent mode)", opt);
      run(*o);
    }
  });
}

}  // namespace microdit::cli
