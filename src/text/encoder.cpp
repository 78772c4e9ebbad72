#include "text/encoder.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <cstdlib>
#include <sys/stat.h>

#include "core/error.h"
#include "core/fs.h"
#include "io/checkpoint.h"
#include "text/bert.h"
#include "text/bpe.h"
#include "text/clip.h"
#include "text/wordpiece.h"

namespace microdit::text {

namespace {
// POSIX stat, not std::filesystem (libtorch.so exports a copy of it that can shadow libstdc++'s).
bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
}  // namespace

std::string text_assets_dir() {
  if (const char* d = std::getenv("MICRODIT_TEXT_DIR"); d && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x)
    return std::string(x) + "/microdit/text";
  const char* home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/microdit/text";
}
std::string minilm_dir() { return text_assets_dir() + "/all-MiniLM-L6-v2"; }
std::string clip_bpe_path() {
  return text_assets_dir() + "/bpe_simple_vocab_16e6.txt.gz";
}

namespace {

constexpr int64_t kDefaultLength = 77;

Tensor ids_tensor(const std::vector<std::vector<int64_t>>& rows, int64_t L) {
  auto t = torch::empty({int64_t(rows.size()), L}, torch::kInt64);
  auto a = t.accessor<int64_t, 2>();
  for (size_t i = 0; i < rows.size(); ++i)
    for (int64_t j = 0; j < L; ++j) a[int64_t(i)][j] = rows[i][size_t(j)];
  return t;
}

class BertEncoder : public TextEncoder {
 public:
  BertEncoder(const std::string& dir, const TextEncoderOptions& o)
      : source_(dir), length_(o.length ? o.length : kDefaultLength), device_(o.device),
        tok_(dir + "/vocab.txt"),
        model_(bert_config_from_json(dir + "/config.json")) {
    const auto& c = model_->config;
    MD_CHECK(length_ >= 2 && length_ <= c.max_position_embeddings,
             "text length {} out of range for BERT (2..{})", length_, c.max_position_embeddings);
    MD_CHECK(tok_.vocab_size() == c.vocab_size, "{}: vocab.txt has {} tokens, config.json says {}",
             dir, tok_.vocab_size(), c.vocab_size);
    const std::string weights = dir + "/model.safetensors";
    LoadOptions lo;
    lo.allow_unexpected = {"pooler.*", "embeddings.position_ids"};
    auto sd = read_safetensors(weights).tensors;
    for (auto& [k, t] : sd)
      if (k.rfind("bert.", 0) == 0) k = k.substr(5);  // BertForX checkpoints
    load_state_dict(*model_, sd, lo, weights);
    model_->eval();
    model_->to(device_);
  }
  std::string describe() const override {
    const auto& c = model_->config;
    return fmt::format("BERT {} layers, width {}, {} heads, {} tokens ({})", c.num_hidden_layers,
                       c.hidden_size, c.num_attention_heads, length_, source_);
  }
  int64_t length() const override { return length_; }
  int64_t width() const override { return model_->config.hidden_size; }
  Tensor tokenize(const std::vector<std::string>& texts) const override {
    std::vector<std::vector<int64_t>> rows;
    for (const auto& t : texts) rows.push_back(tok_.encode_padded(t, length_));
    return ids_tensor(rows, length_);
  }
  Tensor encode_ids(const Tensor& ids) override {
    torch::NoGradGuard ng;
    auto d = ids.to(device_);
    return model_->forward(d, d.ne(tok_.pad_id)).to(torch::kCPU, torch::kFloat32);
  }

 private:
  std::string source_;
  int64_t length_;
  c10::Device device_;
  WordPieceTokenizer tok_;
  BertModel model_;
};

class ClipEncoder : public TextEncoder {
 public:
  ClipEncoder(ClipTextConfig c, const NamedTensors* weights, const std::string& source,
              const TextEncoderOptions& o)
      : source_(source), device_(o.device), skip_(o.clip_skip), model_(nullptr) {
    if (o.length) c.context_length = o.length;
    model_ = ClipTextModel(c);
    if (weights) {
      auto sd = clip_text_state_dict(*weights);
      MD_CHECK(!sd.empty(), "{}: no CLIP text-tower tensors (token_embedding.weight, "
               "transformer.resblocks.*, ...)", source);
      if (o.length) {  // a shorter context keeps the first positions
        for (auto& [k, t] : sd)
          if (k == "positional_embedding" && t.dim() == 2 && t.size(0) > o.length)
            t = t.slice(0, 0, o.length);
      }
      load_state_dict(*model_, sd, {}, source);
    }
    tok_ = std::make_unique<BpeTokenizer>(clip_bpe_path());
    MD_CHECK(tok_->vocab_size() <= c.vocab_size,
             "CLIP tokenizer has {} tokens but the tower's vocabulary is {}", tok_->vocab_size(),
             c.vocab_size);
    MD_CHECK(skip_ >= 0 && skip_ < c.layers, "--clip-skip {} out of range for {} blocks", skip_,
             c.layers);
    model_->eval();
    model_->to(device_);
  }
  std::string describe() const override {
    return fmt::format("OpenCLIP text tower: {}{} ({})", model_->config.summary(),
                       skip_ ? fmt::format(", last {} blocks skipped", skip_) : "", source_);
  }
  int64_t length() const override { return model_->config.context_length; }
  int64_t width() const override { return model_->config.width; }
  Tensor tokenize(const std::vector<std::string>& texts) const override {
    std::vector<std::vector<int64_t>> rows;
    for (const auto& t : texts) rows.push_back(tok_->encode_padded(t, length()));
    return ids_tensor(rows, length());
  }
  Tensor encode_ids(const Tensor& ids) override {
    torch::NoGradGuard ng;
    return model_->forward(ids.to(device_), skip_).to(torch::kCPU, torch::kFloat32);
  }

 private:
  std::string source_;
  c10::Device device_;
  int64_t skip_;
  ClipTextModel model_;
  std::unique_ptr<BpeTokenizer> tok_;  // made after the weights load: shape errors come first
};

std::unique_ptr<TextEncoder> clip_from_file(const std::string& path, const ClipTextConfig* shape,
                                            bool quick_gelu, const TextEncoderOptions& o) {
  MD_CHECK(is_regular_file(path), "CLIP weights not found: {}", path);
  auto tensors = read_checkpoint(path, "");
  ClipTextConfig c = shape ? *shape : clip_config_from_tensors(clip_text_state_dict(tensors));
  c.quick_gelu = quick_gelu;
  return std::make_unique<ClipEncoder>(c, &tensors, path, o);
}

}  // namespace

std::unique_ptr<TextEncoder> make_text_encoder(const std::string& spec,
                                               const TextEncoderOptions& o) {
  if (spec == "minilm" || spec == "all-MiniLM-L6-v2") {
    const std::string dir = minilm_dir();
    MD_CHECK(is_directory(dir), "MiniLM assets not found in {} (run scripts/setup.sh, or set "
             "MICRODIT_TEXT_DIR)", dir);
    return std::make_unique<BertEncoder>(dir, o);
  }
  const auto colon = spec.find(':');
  const std::string head = spec.substr(0, colon), arg = colon == std::string::npos ? "" : spec.substr(colon + 1);
  if (head == "clip-vit-h-14" || head == "clip-vit-h-14-quickgelu") {
    MD_CHECK(!arg.empty(), "encoder '{}' needs weights: '{}:random' or '{}:FILE.safetensors'", spec,
             head, head);
    ClipTextConfig c = clip_vit_h_14();
    c.quick_gelu = head.ends_with("quickgelu");
    if (arg == "random") {
      torch::manual_seed(0);
      return std::make_unique<ClipEncoder>(c, nullptr, "random weights", o);
    }
    return clip_from_file(arg, &c, c.quick_gelu, o);
  }
  if ((head == "clip" || head == "clip-quickgelu") && !arg.empty())
    return clip_from_file(arg, nullptr, head == "clip-quickgelu", o);
  if (is_directory(spec)) return std::make_unique<BertEncoder>(spec, o);
  if (is_regular_file(spec)) return clip_from_file(spec, nullptr, false, o);
  fail("unknown text encoder '{}' (minilm, clip-vit-h-14:random, clip-vit-h-14:FILE, clip:FILE, a "
       "BERT folder or a CLIP .safetensors file)", spec);
}

}  // namespace microdit::text
