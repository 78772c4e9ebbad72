// Hidden-state parity: MiniLM (real all-MiniLM-L6-v2 weights) against transformers /
// sentence-transformers, and a small random open_clip text tower (the ViT-H-14 code path)
// against open_clip. The references are written by tools/export_text_assets.py at set-up;
// the tests skip with a message when they are missing.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sys/stat.h>
#include <unistd.h>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "text/bpe.h"
#include "text/clip.h"
#include "text/encoder.h"

#include "test_util.h"

using namespace microdit;
using microdit::test_util::error_of;
using namespace microdit::text;

namespace {

std::string reference(const std::string& name) {
  return text_assets_dir() + "/reference/" + name + ".safetensors";
}

std::vector<std::string> captions(size_t n) {
  std::ifstream f(std::string(microdit::test_util::source_dir()) + "/tests/data/text_captions.json");
  auto j = nlohmann::json::parse(f);
  std::vector<std::string> out;
  for (size_t i = 0; i < n && i < j.size(); ++i) out.push_back(j[i]);
  return out;
}

double rel_error(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a.to(torch::kFloat64) - b.to(torch::kFloat64)).norm() / b.to(torch::kFloat64).norm())
      .item<double>();
}

// A temporary folder holding only config.json (POSIX calls: see core/fs.h).
struct TempDir {
  std::string path = "/tmp/microdit_text_" + std::to_string(::getpid());
  TempDir() { ::mkdir(path.c_str(), 0700); }
  ~TempDir() {
    ::unlink((path + "/config.json").c_str());
    ::rmdir(path.c_str());
  }
  std::string operator/(const std::string& f) const { return path + "/" + f; }
};

#define SKIP_WITHOUT(path)                                                          \
  if (!is_regular_file(path))                                                            \
  GTEST_SKIP() << "text reference missing: " << (path)                              \
               << " (scripts/setup.sh writes it; needs the pinned Python packages)"

}  // namespace

TEST(MiniLM, HiddenStatesMatchTransformers) {
  SKIP_WITHOUT(reference("minilm"));
  const auto ref = read_safetensors(reference("minilm"));
  const auto& want_ids = ref.at("input_ids");
  auto enc = make_text_encoder("minilm", {.length = want_ids.size(1)});
  EXPECT_EQ(enc->width(), 384);
  const auto caps = captions(size_t(want_ids.size(0)));
  auto ids = enc->tokenize(caps);
  ASSERT_TRUE(torch::equal(ids, want_ids.to(torch::kInt64)));
  auto h = enc->encode_ids(ids);
  const auto& want = ref.at("last_hidden_state");
  ASSERT_EQ(h.sizes(), want.sizes());
  const double err = rel_error(h, want);
  EXPECT_LT(err, 1e-5) << "relative error " << err;
  std::cout << "MiniLM last_hidden_state relative error vs transformers: " << err << "\n";
  // sentence-transformers: mean over real tokens, L2-normalised.
  auto m = ref.at("attention_mask").to(torch::kFloat32).unsqueeze(-1);
  auto pooled = (h * m).sum(1) / m.sum(1);
  pooled = torch::nn::functional::normalize(pooled, torch::nn::functional::NormalizeFuncOptions().dim(1));
  const auto& st = ref.at("sentence_embedding");
  EXPECT_LT(rel_error(pooled.slice(0, 0, st.size(0)), st), 1e-5);
}

TEST(MiniLM, EncodeShape) {
  SKIP_WITHOUT(minilm_dir() + "/model.safetensors");
  auto enc = make_text_encoder("minilm", {.length = 16});
  auto h = enc->encode({"a photo of a cat", ""});
  EXPECT_EQ(h.sizes(), (std::vector<int64_t>{2, 16, 384}));
  EXPECT_TRUE(torch::isfinite(h).all().item<bool>());
}

class ClipTiny : public ::testing::TestWithParam<const char*> {};

TEST_P(ClipTiny, TokensMatchOpenClip) {
  SKIP_WITHOUT(reference(GetParam()));
  SKIP_WITHOUT(clip_bpe_path());
  const auto file = read_safetensors(reference(GetParam()));
  const auto text = clip_text_state_dict(file.tensors);
  auto cfg = clip_config_from_tensors(text);
  EXPECT_EQ(cfg.width, 128);
  EXPECT_EQ(cfg.layers, 3);
  cfg.heads = 2;  // the tiny tower's (not width / 64)
  cfg.quick_gelu = std::string(GetParam()).ends_with("quickgelu");
  ClipTextModel model(cfg);
  load_state_dict(*model, text, {}, reference(GetParam()));
  model->eval();
  BpeTokenizer tok(clip_bpe_path());
  const auto& want_ids = file.at("ref.input_ids");
  const auto caps = captions(size_t(want_ids.size(0)));
  auto ids = torch::empty_like(want_ids, torch::kInt64);
  for (size_t i = 0; i < caps.size(); ++i)
    ids[int64_t(i)] = torch::tensor(tok.encode_padded(caps[i], cfg.context_length));
  ASSERT_TRUE(torch::equal(ids, want_ids.to(torch::kInt64)));
  torch::NoGradGuard ng;
  auto out = model->forward(ids);
  const double err = rel_error(out, file.at("ref.tokens"));
  EXPECT_LT(err, 1e-5) << "relative error " << err;
  std::cout << GetParam() << " tokens relative error vs open_clip: " << err << "\n";
}
INSTANTIATE_TEST_SUITE_P(Acts, ClipTiny, ::testing::Values("clip_tiny", "clip_tiny_quickgelu"));

TEST(Clip, HuggingFaceNamesMapToOpenClip) {
  ClipTextConfig c;
  c.width = 64, c.heads = 1, c.layers = 2, c.context_length = 8, c.vocab_size = 100;
  ClipTextModel ref(c);
  NamedTensors hf;
  for (const auto& [k, t] : state_dict(*ref)) {
    if (k == "token_embedding.weight") hf.emplace_back("text_model.embeddings.token_embedding.weight", t);
    else if (k == "positional_embedding") hf.emplace_back("text_model.embeddings.position_embedding.weight", t);
    else if (k.rfind("ln_final.", 0) == 0) hf.emplace_back("text_model.final_layer_norm." + k.substr(9), t);
  }
  for (int i = 0; i < 2; ++i) {
    auto b = ref->resblocks[size_t(i)]->as<ResidualAttentionBlock>();
    const std::string p = "text_model.encoder.layers." + std::to_string(i) + ".";
    auto w = b->attn->in_proj_weight.chunk(3), bias = b->attn->in_proj_bias.chunk(3);
    const char* qkv[] = {"q", "k", "v"};
    for (int j = 0; j < 3; ++j) {
      hf.emplace_back(p + "self_attn." + qkv[j] + "_proj.weight", w[size_t(j)]);
      hf.emplace_back(p + "self_attn." + qkv[j] + "_proj.bias", bias[size_t(j)]);
    }
    hf.emplace_back(p + "self_attn.out_proj.weight", b->attn->out_proj->weight);
    hf.emplace_back(p + "self_attn.out_proj.bias", b->attn->out_proj->bias);
    hf.emplace_back(p + "layer_norm1.weight", b->ln_1->weight);
    hf.emplace_back(p + "layer_norm1.bias", b->ln_1->bias);
    hf.emplace_back(p + "layer_norm2.weight", b->ln_2->weight);
    hf.emplace_back(p + "layer_norm2.bias", b->ln_2->bias);
    hf.emplace_back(p + "mlp.fc1.weight", b->mlp->c_fc->weight);
    hf.emplace_back(p + "mlp.fc1.bias", b->mlp->c_fc->bias);
    hf.emplace_back(p + "mlp.fc2.weight", b->mlp->c_proj->weight);
    hf.emplace_back(p + "mlp.fc2.bias", b->mlp->c_proj->bias);
  }
  ClipTextModel loaded(c);
  load_state_dict(*loaded, clip_text_state_dict(hf));
  auto ids = torch::randint(0, 100, {2, 8}, torch::kInt64);
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::allclose(loaded->forward(ids), ref->forward(ids)));
}

TEST(Clip, SkipLastBlocks) {
  ClipTextConfig c;
  c.width = 64, c.heads = 1, c.layers = 3, c.context_length = 8, c.vocab_size = 100;
  ClipTextModel full(c);
  c.layers = 2;
  ClipTextModel two(c);
  LoadOptions lo;
  lo.allow_unexpected = {"transformer.resblocks.2.*"};
  load_state_dict(*two, state_dict(*full), lo);
  auto ids = torch::randint(0, 100, {2, 8}, torch::kInt64);
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::equal(full->forward(ids, 1), two->forward(ids)));
  EXPECT_FALSE(error_of([&] { full->forward(ids, 3); }).empty());
}

TEST(Clip, VitH14Shape) {
  ClipTextModel m(clip_vit_h_14());
  int64_t n = 0;
  for (const auto& p : m->parameters()) n += p.numel();
  // open_clip ViT-H-14 text tower without text_projection: 49408*1024 + 77*1024 + 24 blocks
  // of 12.6M + the final LayerNorm.
  EXPECT_EQ(n, 49408 * 1024 + 77 * 1024 + 24 * (4 * 1024 * 1024 + 4 * 1024 + 8 * 1024 * 1024 +
                                                 4 * 1024 + 1024 + 4 * 1024) + 2 * 1024);
  torch::NoGradGuard ng;
  auto out = m->forward(torch::zeros({1, 77}, torch::kInt64));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{1, 77, 1024}));
}

TEST(Clip, MismatchedWeightShapes) {
  SKIP_WITHOUT(reference("clip_tiny"));
  SKIP_WITHOUT(clip_bpe_path());
  const auto msg = error_of([] { make_text_encoder("clip-vit-h-14:" + reference("clip_tiny")); });
  EXPECT_NE(msg.find("shape"), std::string::npos) << msg;
}

TEST(TextEncoder, BadSpecs) {
  EXPECT_NE(error_of([] { make_text_encoder("nope"); }).find("unknown text encoder 'nope'"),
            std::string::npos);
  EXPECT_NE(error_of([] { make_text_encoder("clip-vit-h-14"); }).find("needs weights"),
            std::string::npos);
  EXPECT_NE(error_of([] { make_text_encoder("clip:/nonexistent.safetensors"); }).find("not found"),
            std::string::npos);
  TempDir dir;  // a BERT folder without vocab.txt
  std::ofstream(dir / "config.json") << "{\"hidden_size\": 32, \"num_attention_heads\": 2}";
  EXPECT_NE(error_of([&] { make_text_encoder(dir.path); }).find("vocabulary file not found"),
            std::string::npos);
}
