// microdit prepare --images: webdataset tars, the three sources, skipped items and their report,
// latents equal to a direct VAE encode with the documented noise, resume after a kill giving
// byte-identical output, and mosaicml-streaming reading the result. A tiny random VAE in the
// SDXL structure (tests/data/vae_small) and MiniLM (skipped visibly without its assets).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "data/image_io.h"
#include "data/mds.h"
#include "data/prepare_latents.h"
#include "data/webdataset.h"
#include "test_util.h"
#include "text/encoder.h"
#include "vae/autoencoder_kl.h"

using namespace microdit;
using json = nlohmann::json;
using microdit::test_util::streaming_python;
using microdit::test_util::read_file_bytes;
using microdit::test_util::error_of;

namespace {

const std::string kData = std::string(microdit::test_util::source_dir()) + "/tests/data/";
const std::string kVae = kData + "vae_small";


void spit(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A fresh, empty folder under the test temp dir.
std::string fresh_dir(const std::string& name) {
  const std::string d = ::testing::TempDir() + "md_prepare_" + name + "_" + std::to_string(::getpid());
  std::system(("rm -rf '" + d + "'").c_str());
  make_dirs(d);
  return d;
}

bool have_minilm() { return is_regular_file(text::minilm_dir() + "/vocab.txt"); }

// One intra-op thread for the tiny models: LibTorch's spinning intra-op threads make a run
// many times slower on a loaded 2-core machine, and one thread is plenty here.
struct OneThread {
  int saved = at::get_num_threads();
  OneThread() { at::set_num_threads(1); }
  ~OneThread() { at::set_num_threads(saved); }
};

#define NEED_ASSETS()                                                                       \
  do {                                                                                      \
    if (!have_minilm()) GTEST_SKIP() << "MiniLM assets not found (run scripts/setup.sh)";   \
    if (!is_regular_file(kVae + "/config.json")) GTEST_SKIP() << kVae << " not found";      \
  } while (0);                                                                              \
  OneThread one_thread_

// Good items: {file name, fixture, caption}; images of assorted formats and sizes.
struct Good {
  std::string file, fixture, caption;
};
const std::vector<Good>& good_items() {
  static const std::vector<Good> g = {
      {"a0.jpg", "img_420.jpg", "a red fox in the snow"},
      {"a1.png", "img_rgb.png", "two cats on a sofa"},
      {"a2.webp", "img_lossy.webp", "a lighthouse at dusk"},
      {"a3.jpg", "img_noise.jpg", "noise, mostly grey"},
      {"a4.png", "img_palette.png", "a palette image"},
      {"a5.jpg", "img_444.jpg", "the last good one"},
      {"a6.jpg", "img_progressive.jpg", "a progressive jpeg"},
  };
  return g;
}

// The good items, plus (when `bad`) a truncated JPEG, a text file named .png, a zero-byte
// file, an image without caption and one with an empty caption, interleaved.
void make_folder(const std::string& dir, bool bad) {
  make_dirs(dir);
  for (const auto& g : good_items()) {
    spit(dir + "/" + g.file, read_file_bytes(kData + g.fixture));
    spit(dir + "/" + g.file.substr(0, 2) + ".txt", g.caption + "\n");
  }
  if (!bad) return;
  const std::string jpg = read_file_bytes(kData + "img_noise.jpg");
  spit(dir + "/a1b_truncated.jpg", jpg.substr(0, jpg.size() / 2));
  spit(dir + "/a1b_truncated.txt", "cut in half");
  spit(dir + "/a2b_text.png", "this is not a PNG\n");
  spit(dir + "/a2b_text.txt", "a text file");
  spit(dir + "/a3b_zero.jpg", "");
  spit(dir + "/a3b_zero.txt", "nothing");
  spit(dir + "/a4b_nocaption.jpg", jpg);
  spit(dir + "/a5b_empty.jpg", jpg);
  spit(dir + "/a5b_empty.txt", "  \n");
}

PrepareLatentsOptions tiny_options(const std::string& src, const std::string& out) {
  PrepareLatentsOptions o;
  o.source = src;
  o.out = out;
  o.vae = kVae;
  o.encoder = "minilm";
  o.sizes = {32, 16};  // sorted by prepare: latents_16, latents_32
  o.batch = 3;
  o.workers = 2;
  o.device = "cpu";
  o.size_limit = 130000;  // ~2 samples of (1, 77, 384) float16 per shard: several shards
  return o;
}

std::vector<std::string> shard_files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& n : list_dir(dir))
    if (n.rfind("shard.", 0) == 0) out.push_back(n);
  return out;
}

void expect_same_output(const std::string& a, const std::string& b) {
  const auto fa = shard_files(a), fb = shard_files(b);
  ASSERT_EQ(fa, fb);
  ASSERT_FALSE(fa.empty());
  for (const auto& f : fa) EXPECT_EQ(read_file_bytes(a + "/" + f), read_file_bytes(b + "/" + f)) << f;
  EXPECT_EQ(read_file_bytes(a + "/index.json"), read_file_bytes(b + "/index.json"));
}


int run_status(const std::string& cmd) {
  const int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

}  // namespace

// ---- webdataset ----------------------------------------------------------------------------

TEST(WebDataset, KeyRules) {
  EXPECT_EQ(webdataset_split_name("000123.jpg"), std::make_pair(std::string("000123"), std::string("jpg")));
  EXPECT_EQ(webdataset_split_name("dir.x/000123.seg.PNG"),
            std::make_pair(std::string("dir.x/000123"), std::string("seg.png")));
  EXPECT_EQ(webdataset_split_name(".hidden.txt").first, "");
  EXPECT_EQ(webdataset_split_name("dir/noext").first, "");
  EXPECT_EQ(webdataset_split_name("dir/trailing.").first, "");
  EXPECT_TRUE(is_tar_name("a/B.TAR"));
  EXPECT_FALSE(is_tar_name("a/b.tar.txt"));
}

TEST(WebDataset, GroupsMembersAndSurvivesCorruptTars) {
  const std::string d = fresh_dir("wds");
  write_tar(d + "/s0.tar", {{"k0.jpg", "J0"}, {"k0.txt", "cap 0"}, {"k0.cls", "7"},
                            {"sub/k1.png", "P1"}, {"sub/k1.json", R"({"caption": "c1"})"},
                            {".skip", "x"}, {"k2.txt", "only text"},
                            {"k3.jpg", "J3"}, {"k3.jpg", "dup"}});
  // A tar cut in the middle of a member's data, and a file that is no tar at all.
  write_tar(d + "/s1.tar", {{"m0.jpg", std::string(3000, 'a')}, {"m0.txt", "ok"},
                            {"m1.jpg", std::string(5000, 'b')}, {"m1.txt", "lost"}});
  const std::string s1 = read_file_bytes(d + "/s1.tar");
  spit(d + "/s1.tar", s1.substr(0, 512 * 10));  // headers+data of m0 and part of m1.jpg
  spit(d + "/s2.tar", "definitely not a tar archive, just some text to read");

  const auto tars = expand_tar_sources(d);
  ASSERT_EQ(tars.size(), 3u);
  EXPECT_EQ(expand_tar_sources(d + "/s[01].tar").size(), 2u);
  EXPECT_NE(error_of([&] { expand_tar_sources(d + "/none-*.tar"); }).find("no such file"), std::string::npos);

  WebDatasetReader r(tars, {"jpg", "png", "txt", "json"});
  std::vector<WebDatasetSample> got;
  WebDatasetSample s;
  while (r.next(s)) got.push_back(s);
  ASSERT_EQ(got.size(), 7u);
  EXPECT_EQ(got[0].key, "k0");
  EXPECT_EQ(got[0].files.at("jpg"), "J0");
  EXPECT_EQ(got[0].files.at("txt"), "cap 0");
  EXPECT_EQ(got[0].files.count("cls"), 0u);  // not kept
  EXPECT_EQ(got[1].key, "sub/k1");
  EXPECT_EQ(got[1].files.at("json"), R"({"caption": "c1"})");
  EXPECT_EQ(got[2].key, "k2");
  EXPECT_EQ(got[2].files.size(), 1u);
  EXPECT_NE(got[3].error.find("duplicate member k3.jpg"), std::string::npos);
  EXPECT_EQ(got[4].key, "m0");
  EXPECT_TRUE(got[4].error.empty()) << got[4].error;
  EXPECT_EQ(got[4].files.at("jpg"), std::string(3000, 'a'));
  EXPECT_EQ(got[5].key, "m1");
  EXPECT_NE(got[5].error.find("truncated"), std::string::npos) << got[5].error;
  EXPECT_NE(got[6].name().find("s2.tar"), std::string::npos);
  EXPECT_NE(got[6].error.find("cannot read tar"), std::string::npos) << got[6].error;
  EXPECT_EQ(count_webdataset_samples(tars), 7);
}

TEST(PrepareLatents, PilPayload) {
  std::string p;
  auto u32 = [&](uint32_t v) { p.append(reinterpret_cast<const char*>(&v), 4); };
  u32(2), u32(1), u32(4), p += "RGBA", p += std::string("\x01\x02\x03\xff\x04\x05\x06\x00", 8);
  const Image img = decode_pil_payload(p, "x");
  ASSERT_EQ(img.width, 2);
  ASSERT_EQ(img.height, 1);
  EXPECT_EQ(img.pixels, (std::vector<uint8_t>{1, 2, 3, 4, 5, 6}));  // alpha dropped, as convert("RGB")
  EXPECT_NE(error_of([&] { decode_pil_payload(p.substr(0, p.size() - 1), "x"); }).find("pixel bytes"),
            std::string::npos);
  std::string q;
  auto w32 = [&](uint32_t v) { q.append(reinterpret_cast<const char*>(&v), 4); };
  w32(1), w32(1), w32(1), q += "P", q += "\x05";
  EXPECT_NE(error_of([&] { decode_pil_payload(q, "x"); }).find("mode 'P'"), std::string::npos);
}

// ---- the prepare ---------------------------------------------------------------------------

TEST(PrepareLatents, SkipsBadItemsReportsThemAndMatchesADirectEncode) {
  NEED_ASSETS();
  const std::string d = fresh_dir("bad");
  make_folder(d + "/src", true);
  auto o = tiny_options(d + "/src", d + "/out");
  const auto r = prepare_latents(o);
  EXPECT_FALSE(r.already_done);
  EXPECT_EQ(r.items, 12);
  EXPECT_EQ(r.written, 7);
  EXPECT_EQ(r.skipped, 5);
  EXPECT_GE(r.shards, 3);
  EXPECT_NE(r.summary.find("5 skipped (2 missing/empty caption, 3 unreadable image)"), std::string::npos)
      << r.summary;

  const json rep = json::parse(read_file_bytes(d + "/out/prepare-report.json"));
  ASSERT_EQ(rep["skipped_items"].size(), 5u);
  std::map<std::string, std::string> reason;
  for (const auto& s : rep["skipped_items"])
    reason[s["item"].get<std::string>().substr(d.size() + 5)] = s["reason"];
  EXPECT_NE(reason["a1b_truncated.jpg"].find("JPEG"), std::string::npos) << reason["a1b_truncated.jpg"];
  EXPECT_NE(reason["a2b_text.png"].find("unsupported image format"), std::string::npos) << reason["a2b_text.png"];
  EXPECT_NE(reason["a3b_zero.jpg"].find("empty"), std::string::npos) << reason["a3b_zero.jpg"];
  EXPECT_NE(reason["a4b_nocaption.jpg"].find("missing caption"), std::string::npos);
  EXPECT_EQ(reason["a5b_empty.jpg"], "empty caption");
  EXPECT_FALSE(is_regular_file(d + "/out/.prepare-state.json"));

  const json meta = json::parse(read_file_bytes(d + "/out/microdit.json"));
  EXPECT_EQ(meta["encoder"], "minilm");
  EXPECT_EQ(meta["caption_shape"], json({1, 77, 384}));
  EXPECT_EQ(meta["latent_channels"], 4);
  EXPECT_EQ(meta["sizes"], json({16, 32}));
  EXPECT_DOUBLE_EQ(meta["scaling_factor"].get<double>(), 0.13025);

  MDSDataset ds({d + "/out"});
  ASSERT_EQ(ds.size(), 7);
  std::vector<std::string> names;
  for (const auto& c : ds.columns()) names.push_back(c.name + ":" + c.encoding);
  EXPECT_EQ(names, (std::vector<std::string>{"caption:str", "caption_latents:bytes", "latents_16:bytes",
                                             "latents_32:bytes"}));
  const json index = json::parse(read_file_bytes(d + "/out/index.json"));
  EXPECT_EQ(index["shards"][0]["size_limit"], 130000);
  EXPECT_TRUE(index["shards"][0]["compression"].is_null());

  // Sample 2 is a2.webp, input index 3 (after a1b_truncated.jpg): its latents must be the VAE's
  // posterior mean + std * eps with eps from a generator seeded 2024 + 3 (size 16 drawn first).
  const auto& g = good_items()[2];
  EXPECT_EQ(ds.get(2, "caption"), g.caption);
  torch::NoGradGuard ng;
  auto vae = load_vae(kVae, torch::kCPU);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2024 + 3);
  const Image img = decode_image_bytes(read_file_bytes(kData + g.fixture), g.fixture);
  for (int s : {16, 32}) {
    const auto post = vae->encode(reference_preprocess(img, s).unsqueeze(0));
    const auto eps = at::randn({4, s / 8, s / 8}, gen);
    const auto want = (post.sample_with_noise(eps.unsqueeze(0)) * 0.13025)[0];
    const auto got = mds::latent_image_tensor(ds.get(2, "latents_" + std::to_string(s)), s, "latents").to(torch::kFloat);
    EXPECT_TRUE(torch::allclose(got, want, 2e-3, 2e-3)) << s << ": max diff " << (got - want).abs().max().item<float>();
    EXPECT_GT((got - (post.mode() * 0.13025)[0]).abs().max().item<float>(), 1e-3) << "a sample, not the mode";
  }
  auto enc = text::make_text_encoder("minilm", {77, torch::kCPU});
  const auto want_cap = enc->encode({g.caption}).to(torch::kHalf);
  const auto got_cap = mds::caption_latent_tensor(ds.get(2, "caption_latents"), 384, "caption_latents");
  EXPECT_EQ(got_cap.sizes().vec(), (std::vector<int64_t>{1, 77, 384}));
  EXPECT_TRUE(torch::allclose(got_cap.to(torch::kFloat), want_cap.to(torch::kFloat), 1e-3, 1e-3));

  // A finished prepare is a no-op; other settings or a foreign MDS folder are refused.
  const auto again = prepare_latents(o);
  EXPECT_TRUE(again.already_done);
  EXPECT_NE(again.summary.find("nothing to do"), std::string::npos);
  auto o2 = o;
  o2.seed = 7;
  EXPECT_NE(error_of([&] { prepare_latents(o2); }).find("other settings (seed 2024 -> 7)"), std::string::npos);
  const std::string foreign = fresh_dir("foreign");
  spit(foreign + "/index.json", R"({"shards": [], "version": 2})");
  auto o3 = o;
  o3.out = foreign;
  EXPECT_NE(error_of([&] { prepare_latents(o3); }).find("not made by `microdit prepare --images`"),
            std::string::npos);
}

TEST(PrepareLatents, TarAndMdsSourcesGiveTheFolderBytes) {
  NEED_ASSETS();
  const std::string d = fresh_dir("sources");
  make_folder(d + "/src", false);
  auto o = tiny_options(d + "/src", d + "/from_folder");
  o.sizes = {16};
  ASSERT_EQ(prepare_latents(o).written, 7);

  // The same items as webdataset tars (split over two shards, json captions in the second) ...
  make_dirs(d + "/tars");
  std::vector<std::pair<std::string, std::string>> t0, t1;
  for (size_t i = 0; i < good_items().size(); ++i) {
    const auto& g = good_items()[i];
    const std::string key = g.file.substr(0, 2), ext = g.file.substr(3);
    auto& t = i < 4 ? t0 : t1;
    t.emplace_back(key + "." + ext, read_file_bytes(kData + g.fixture));
    if (i < 4) t.emplace_back(key + ".txt", g.caption);
    else t.emplace_back(key + ".json", json({{"url", "x"}, {"caption", g.caption}}).dump());
  }
  write_tar(d + "/tars/part-000.tar", t0);
  write_tar(d + "/tars/part-001.tar", t1);
  o.source = d + "/tars/part-*.tar";
  o.out = d + "/from_tar";
  ASSERT_EQ(prepare_latents(o).written, 7);
  expect_same_output(d + "/from_folder", d + "/from_tar");

  // ... and as an image MDS (columns image: bytes, caption: str, width: int32).
  {
    MDSWriter w(d + "/mds", {{"image", "bytes"}, {"caption", "str"}, {"width", "int32"}});
    for (const auto& g : good_items())
      w.write({mds::encode_str(g.caption), mds::encode_str(read_file_bytes(kData + g.fixture)),
               mds::encode_scalar_int("int32", 1)});  // sorted: caption, image, width
    w.finish();
  }
  o.source = d + "/mds";
  o.out = d + "/from_mds";
  ASSERT_EQ(prepare_latents(o).written, 7);
  expect_same_output(d + "/from_folder", d + "/from_mds");

  auto o2 = o;
  o2.caption_key = "nope";
  o2.out = d + "/unused";
  EXPECT_NE(error_of([&] { prepare_latents(o2); }).find("no caption column 'nope'"), std::string::npos);
}

TEST(PrepareLatents, ResumeAfterAKillIsByteIdentical) {
  NEED_ASSETS();
  const char* bin = std::getenv("MICRODIT_BIN");
  if (!bin || !is_regular_file(bin)) GTEST_SKIP() << "MICRODIT_BIN not set (run through ctest)";
  const std::string d = fresh_dir("resume");
  make_folder(d + "/src", true);
  const std::string args = fmt::format(
      "{} prepare --images {}/src --vae {} --sizes 16,32 --batch 3 --workers 2 --threads 1 --device cpu "
      "--size-limit 130000 --out ",
      bin, d, kVae);
  ASSERT_EQ(run_status(args + d + "/full > " + d + "/full.log 2>&1"), 0) << read_file_bytes(d + "/full.log");
  // Killed (as kill -9: _Exit, no clean-up) right after its 2nd shard, in the middle of a batch.
  ASSERT_EQ(run_status("MICRODIT_PREPARE_ABORT_AFTER_SHARDS=2 " + args + d + "/part > " + d +
                       "/part1.log 2>&1"),
            75)
      << read_file_bytes(d + "/part1.log");
  EXPECT_FALSE(is_regular_file(d + "/part/index.json"));
  const json st = json::parse(read_file_bytes(d + "/part/.prepare-state.json"));
  EXPECT_EQ(st["shards"], 2);
  EXPECT_EQ(read_file_bytes(d + "/part/.prepare-shards.jsonl").find("shard.00001.mds") != std::string::npos, true);
  EXPECT_GT(st["consumed"].get<int>() % 3, 0) << "the kill should fall inside a batch";
  ASSERT_EQ(run_status(args + d + "/part > " + d + "/part2.log 2>&1"), 0) << read_file_bytes(d + "/part2.log");
  const std::string log2 = read_file_bytes(d + "/part2.log");
  EXPECT_NE(log2.find("resuming: 2 shard(s) kept"), std::string::npos) << log2;
  EXPECT_NE(log2.find("prepared 7 samples"), std::string::npos) << log2;
  expect_same_output(d + "/full", d + "/part");
  EXPECT_EQ(read_file_bytes(d + "/full/microdit.json"), read_file_bytes(d + "/part/microdit.json"));
  EXPECT_EQ(json::parse(read_file_bytes(d + "/full/prepare-report.json"))["skipped_items"].size(), 5u);
  EXPECT_EQ(read_file_bytes(d + "/full/prepare-report.json"), read_file_bytes(d + "/part/prepare-report.json"));
  ASSERT_EQ(run_status(args + d + "/part > " + d + "/part3.log 2>&1"), 0);
  EXPECT_NE(read_file_bytes(d + "/part3.log").find("nothing to do"), std::string::npos);
}

TEST(PrepareLatents, MosaicStreamingReadsTheOutput) {
  NEED_ASSETS();
  const std::string py = streaming_python();
  if (py.empty()) GTEST_SKIP() << "mosaicml-streaming venv not found (run scripts/setup_data.sh)";
  const std::string d = fresh_dir("streaming");
  make_folder(d + "/src", true);
  const auto r = prepare_latents(tiny_options(d + "/src", d + "/out"));
  ASSERT_EQ(r.written, 7);
  const std::string cmd = fmt::format("cd / && {} {}/tests/prepare_streaming_check.py {}/out 32 384 > {}/py.json 2> {}/py.err",
                                      py, microdit::test_util::source_dir(), d, d, d);
  ASSERT_EQ(run_status(cmd), 0) << read_file_bytes(d + "/py.err");
  const json got = json::parse(read_file_bytes(d + "/py.json"));
  EXPECT_EQ(got["count"], 7);
  EXPECT_EQ(got["columns"], json({"caption", "caption_latents", "latents_16", "latents_32"}));
  std::vector<std::string> caps;
  for (const auto& g : good_items()) caps.push_back(g.caption);
  EXPECT_EQ(got["captions"], json(caps));
  EXPECT_EQ(got["caption_shape"], json({1, 77, 384}));
  MDSDataset ds({d + "/out"});
  const auto lat = mds::latent_image_tensor(ds.get(0, "latents_32"), 32, "latents_32").to(torch::kFloat);
  ASSERT_EQ(got["latents"].size(), 4u);
  for (int c = 0; c < 4; ++c)
    for (int y = 0; y < 4; ++y)
      for (int x = 0; x < 4; ++x)
        EXPECT_EQ(got["latents"][c][y][x].get<double>(), lat[c][y][x].item<double>());
  const auto cap = mds::caption_latent_tensor(ds.get(0, "caption_latents"), 384, "c").to(torch::kFloat);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(got["caption_first"][k].get<double>(), cap[0][0][k].item<double>());
}
