// microdit prepare: images + captions -> shards of (pixels in [-1, 1], caption embeddings from
// the frozen text encoder), so that training touches neither pixels nor text.
#include <nlohmann/json.hpp>

#include <fstream>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/progress.h"
#include "data/image.h"
#include "data/shards.h"
#include "text/encoder.h"

namespace microdit::cli {

namespace {

struct PrepareOptions {
  RuntimeOptions rt;
  std::string dataset, out, encoder = "minilm";
  int caption_len = 0;  // 0: the longest caption's token count, so none is truncated
  int batch = 64, shard_size = 1024;
};

struct Item {
  std::string file, caption, split;
};

std::vector<Item> read_captions(const std::string& dir) {
  const std::string path = dir + "/captions.jsonl";
  MD_CHECK(is_regular_file(path), "{}: no such file (make a dataset with `microdit dataset emoji`)", path);
  std::ifstream in(path);
  std::vector<Item> items;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    MD_CHECK(!j.is_discarded() && j.contains("file") && j.contains("caption"),
             "{}:{}: expected a JSON object with file and caption", path, n);
    items.push_back({j["file"].get<std::string>(), j["caption"].get<std::string>(),
                     j.value("split", std::string("train"))});
  }
  MD_CHECK(!items.empty(), "{}: no captions", path);
  return items;
}

void run(const PrepareOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  auto items = read_captions(o.dataset);
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
  for (size_t s = 0; s < items.size(); s += o.batch) {
    const size_t n = std::min<size_t>(o.batch, items.size() - s);
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
  auto* cmd = app.add_subcommand("prepare", "precompute training shards from images and captions");
  cmd->add_option("--dataset", o->dataset, "folder with captions.jsonl and images")->required();
  cmd->add_option("--out", o->out, "output folder for the shards")->required();
  cmd->add_option("--encoder", o->encoder, "frozen text encoder (see encode-text)")->capture_default_str();
  cmd->add_option("--caption-len", o->caption_len, "caption tokens (0: longest caption)")->capture_default_str();
  cmd->add_option("--batch", o->batch, "captions per encoder batch")->capture_default_str();
  cmd->add_option("--shard-size", o->shard_size, "samples per shard")->capture_default_str();
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
