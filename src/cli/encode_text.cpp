// microdit encode-text: token ids or hidden states of a frozen text encoder, for a few texts
// (--text) or a caption file (--captions, one caption per line, batched with a progress bar).
#include <fmt/format.h>
#include <torch/torch.h>

#include <chrono>
#include <fstream>
#include <unistd.h>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "text/encoder.h"
#include "text/unicode.h"

namespace microdit::cli {

namespace {

struct EncodeTextOptions {
  RuntimeOptions rt;
  std::string encoder = "minilm", captions, out;
  std::vector<std::string> texts;
  int64_t length = 0, batch_size = 32, clip_skip = 0;
  bool ids = false;
};

std::vector<std::string> read_captions(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MD_CHECK(f, "captions file not found: {}", path);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(f, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    text::utf8_decode(line, fmt::format("{} line {}", path, out.size() + 1));
    out.push_back(std::move(line));
  }
  return out;
}

void progress(size_t done, size_t total, double seconds) {
  if (!isatty(STDERR_FILENO) && done != total && done % 1024 != 0) return;
  const int w = 30, fill = total ? int(w * done / total) : w;
  fmt::print(stderr, "\r[{}{}] {}/{} captions, {:.1f}/s", std::string(size_t(fill), '#'),
             std::string(size_t(w - fill), '.'), done, total, seconds > 0 ? done / seconds : 0.0);
  if (done == total) fmt::print(stderr, "\n");
  std::fflush(stderr);
}

void run(const EncodeTextOptions& o) {
  set_threads(o.rt.threads);
  MD_CHECK(!o.texts.empty() || !o.captions.empty(), "give --text or --captions");
  MD_CHECK(o.batch_size >= 1, "--batch-size must be >= 1");
  std::vector<std::string> texts = o.texts;
  for (const auto& t : texts) text::utf8_decode(t, "--text");
  if (!o.captions.empty()) {
    auto more = read_captions(o.captions);
    texts.insert(texts.end(), more.begin(), more.end());
  }
  auto enc = text::make_text_encoder(o.encoder, {.length = o.length, .device = resolve_device(o.rt.device), .clip_skip = o.clip_skip});
  const auto t0 = std::chrono::steady_clock::now();  // rates include tokenizing
  auto ids = enc->tokenize(texts);  // (N, L)
  if (o.ids) {
    for (int64_t i = 0; i < ids.size(0); ++i) {
      auto row = ids[i].contiguous();
      const auto* p = row.data_ptr<int64_t>();
      fmt::print("{}\n", fmt::join(p, p + row.numel(), " "));
    }
    if (o.out.empty()) return;
  }
  const int64_t N = ids.size(0), L = enc->length(), W = enc->width();
  fmt::print(stderr, "encoder: {}\n", enc->describe());
  auto emb = torch::empty({N, L, W}, torch::kFloat32);
  const bool bar = !o.captions.empty();
  for (int64_t s = 0; s < N; s += o.batch_size) {
    const int64_t e = std::min(N, s + o.batch_size);
    emb.slice(0, s, e).copy_(enc->encode_ids(ids.slice(0, s, e)));
    if (bar)
      progress(size_t(e), size_t(N),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (!o.out.empty()) {
    write_safetensors(o.out, {{"embeddings", emb}, {"input_ids", ids}},
                      {{"encoder", o.encoder}, {"describe", enc->describe()}});
    fmt::print("wrote embeddings ({}, {}, {}) and input_ids to {}\n", N, L, W, o.out);
    return;
  }
  fmt::print("shape: ({}, {}, {})\n", N, L, W);
  for (int64_t i = 0; i < std::min<int64_t>(N, 8); ++i) {
    auto e = emb[i];
    fmt::print("text {}: {} tokens, mean {:+.5f}, std {:.5f}, first [{:+.4f}, {:+.4f}, {:+.4f}]\n", i,
               ids[i].ne(0).sum().item<int64_t>(), e.mean().item<double>(), e.std().item<double>(),
               e[0][0].item<double>(), e[0][1].item<double>(), e[0][2].item<double>());
  }
}

}  // namespace

void register_encode_text(CLI::App& app) {
  auto o = std::make_shared<EncodeTextOptions>();
  auto* cmd = app.add_subcommand("encode-text", "token ids or embeddings from a frozen text encoder");
  cmd->add_option("--encoder", o->encoder,
                  "minilm, clip-vit-h-14:random, clip-vit-h-14[-quickgelu]:FILE, clip:FILE, a BERT "
                  "folder or a CLIP .safetensors")
      ->capture_default_str();
  cmd->add_option("--text", o->texts, "text to encode (repeatable)");
  cmd->add_option("--captions", o->captions, "file with one caption per line");
  cmd->add_option("--out", o->out, "write embeddings (N, L, W) and input_ids to this .safetensors");
  cmd->add_flag("--ids", o->ids, "print the token ids, one line per text");
  cmd->add_option("--length", o->length, "tokens per text L (default 77)");
  cmd->add_option("--clip-skip", o->clip_skip,
                  "CLIP: leave out the last N blocks before the final LayerNorm (SD 2.x: 1)");
  cmd->add_option("--batch-size", o->batch_size, "texts per forward pass")->capture_default_str();
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
