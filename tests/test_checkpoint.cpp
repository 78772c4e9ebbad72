#include <gtest/gtest.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/microdit.h"

#include "test_util.h"

using namespace microdit;
using microdit::test_util::error_of;
namespace fs = std::filesystem;

namespace {

ModelConfig tiny() { return test_util::tiny_config(); }

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("microdit_test_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  // Not fs::remove_all: LibTorch exports a broken copy of it that can shadow libstdc++'s.
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path.string() + "'").c_str()); }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

NamedTensors without(NamedTensors sd, const std::string& key) {
  std::erase_if(sd, [&](const auto& kv) { return kv.first == key; });
  return sd;
}

}  // namespace

TEST(Checkpoint, NamesMatchTheReference) {
  MicroDiT m(tiny());
  std::set<std::string> names;
  for (const auto& [k, t] : state_dict(*m)) names.insert(k);
  for (const char* k : {"pos_embed", "mask_token", "x_embedder.proj.weight", "t_embedder.mlp.2.bias",
                        "y_embedder.y_proj.norm.weight", "y_emb_preprocess.mlp.w3.weight",
                        "pooled_y_emb_process.fc2.bias", "blocks.1.adaLN_modulation.1.weight",
                        "blocks.0.cross_attn.kv_linear.weight", "final_layer.linear.weight",
                        "final_layer.adaLN_modulation.1.bias"})
    EXPECT_TRUE(names.count(k)) << k;
  EXPECT_FALSE(names.count("blocks.0.attn.ln_q.weight"));  // LN0 has no parameters
}

TEST(Checkpoint, SafetensorsRoundTrip) {
  TempDir dir;
  MicroDiT a(tiny()), b(tiny());
  write_safetensors(dir / "m.safetensors", state_dict(*a), {{"k", "v"}});
  auto f = read_safetensors(dir / "m.safetensors");
  EXPECT_EQ(f.metadata.at("k"), "v");
  auto header = read_safetensors(dir / "m.safetensors", /*with_data=*/false);  // metadata only
  EXPECT_EQ(header.metadata, f.metadata);
  EXPECT_TRUE(header.tensors.empty());
  load_state_dict(*b, f.tensors);
  for (const auto& [k, t] : state_dict(*a)) EXPECT_TRUE(torch::equal(t, *read_safetensors(dir / "m.safetensors").find(k)));
  EXPECT_TRUE(fs::exists(dir / "m.safetensors"));
  EXPECT_FALSE(fs::exists(dir / ("m.safetensors.tmp." + std::to_string(::getpid()))));
}

TEST(Checkpoint, MissingExtraAndMisShapedKeysAreNamed) {
  MicroDiT m(tiny());
  auto sd = state_dict(*m);
  EXPECT_NE(error_of([&] { load_state_dict(*m, without(sd, "blocks.1.norm2.weight")); })
                .find("missing key 'blocks.1.norm2.weight'"),
            std::string::npos);
  auto extra = sd;
  extra.emplace_back("blocks.9.attn.qkv.weight", torch::zeros({3}));
  EXPECT_NE(error_of([&] { load_state_dict(*m, extra); }).find("unexpected key 'blocks.9.attn.qkv.weight'"),
            std::string::npos);
  auto bad = sd;
  for (auto& [k, t] : bad)
    if (k == "final_layer.linear.weight") t = torch::zeros({3, 3});
  EXPECT_NE(error_of([&] { load_state_dict(*m, bad); }).find("key 'final_layer.linear.weight' has shape [3, 3]"),
            std::string::npos);
  // Allow-lists, as a stage change needs them; shape errors stay errors.
  LoadOptions opt;
  opt.allow_missing = {"blocks.*.norm2.weight"};
  opt.allow_unexpected = {"blocks.9.*"};
  auto rep = load_state_dict(*m, without(extra, "blocks.1.norm2.weight"), opt);
  EXPECT_EQ(rep.missing, std::vector<std::string>{"blocks.1.norm2.weight"});
  EXPECT_EQ(rep.unexpected, std::vector<std::string>{"blocks.9.attn.qkv.weight"});
  opt.non_strict = true;
  EXPECT_THROW(load_state_dict(*m, bad, opt), Error);
}

TEST(Checkpoint, TruncatedOrCorruptSafetensorsAreRefused) {
  TempDir dir;
  MicroDiT m(tiny());
  write_safetensors(dir / "m.safetensors", state_dict(*m));
  const auto size = fs::file_size(dir / "m.safetensors");
  fs::copy_file(dir / "m.safetensors", dir / "cut.safetensors");
  fs::resize_file(dir / "cut.safetensors", size - 100);
  EXPECT_NE(error_of([&] { read_safetensors(dir / "cut.safetensors"); }).find("truncated"), std::string::npos);
  // The header alone is checked against the file size too.
  EXPECT_NE(error_of([&] { read_safetensors(dir / "cut.safetensors", false); }).find("truncated"), std::string::npos);
  const std::string junk("\x10\0\0\0\0\0\0\0{not json at all", 24);
  std::ofstream(dir / "junk.safetensors", std::ios::binary) << junk;
  EXPECT_NE(error_of([&] { read_safetensors(dir / "junk.safetensors"); }).find("corrupt"), std::string::npos);
  EXPECT_NE(error_of([&] { read_safetensors(dir / "absent.safetensors"); }).find("no such file"), std::string::npos);
}

TEST(Checkpoint, ReadsTorchSaveZipWithNestedPrefix) {
  TempDir dir;
  MicroDiT a(tiny()), b(tiny());
  // A Composer-style nesting: {"state": {"model": {"dit.<name>": tensor}}}.
  c10::Dict<std::string, at::Tensor> inner;
  for (const auto& [k, t] : state_dict(*a)) inner.insert("dit." + k, t);
  c10::impl::GenericDict model(c10::StringType::get(), c10::AnyType::get());
  c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
  model.insert("model", inner);
  state.insert("state", model);
  auto bytes = torch::pickle_save(state);
  std::ofstream(dir / "c.pt", std::ios::binary).write(bytes.data(), bytes.size());
  auto tensors = read_checkpoint(dir / "c.pt");
  load_state_dict(*b, tensors);
  for (const auto& [k, t] : state_dict(*a)) {
    auto it = std::find_if(tensors.begin(), tensors.end(), [&](const auto& kv) { return kv.first == k; });
    ASSERT_NE(it, tensors.end()) << k;
    EXPECT_TRUE(torch::equal(it->second, t)) << k;
  }
  // A truncated zip is a one-line error, not a crash.
  fs::resize_file(dir / "c.pt", bytes.size() / 2);
  EXPECT_NE(error_of([&] { read_checkpoint(dir / "c.pt"); }).find("not a readable torch.save checkpoint"),
            std::string::npos);
}

TEST(Checkpoint, GlobMatch) {
  EXPECT_TRUE(glob_match("blocks.*.mlp.*", "blocks.3.mlp.w1"));
  EXPECT_FALSE(glob_match("blocks.*.mlp", "blocks.3.mlp.w1"));
  EXPECT_TRUE(glob_match("*", ""));
}
