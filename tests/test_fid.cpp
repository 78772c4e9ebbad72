// FID: .npy/.npz files as NumPy writes them, the Fréchet distance against pytorch-fid's
// calculate_frechet_distance (tests/data/fid_*, tools/make_fid_fixtures.py stats), and the
// FID Inception-v3 against pytorch-fid 0.3.0 on random weights (fixture generated at test
// time by tools/make_fid_fixtures.py inception in the project venv; skipped without it).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "eval/fid.h"
#include "eval/inception.h"
#include "eval/npz.h"
#include "test_util.h"

using namespace microdit;

namespace {

const std::string kData = std::string(microdit::test_util::source_dir()) + "/tests/data/";

at::Tensor array(const NpzArrays& a, const std::string& name) {
  for (const auto& [n, t] : a)
    if (n == name) return t;
  ADD_FAILURE() << "no array " << name;
  return {};
}

double expected_distance(const std::string& name) {
  std::ifstream f(kData + "fid_expected.json");
  return nlohmann::json::parse(f)["distance"][name].get<double>();
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm()).item<double>();
}

}  // namespace

TEST(Npz, ReadsNumpySavezAndCompressed) {
  const auto feats = read_npz(kData + "fid_features.npz");
  ASSERT_EQ(feats.size(), 4u);
  EXPECT_EQ(array(feats, "a").sizes(), (std::vector<int64_t>{300, 64}));
  EXPECT_EQ(array(feats, "a").scalar_type(), at::kFloat);
  EXPECT_EQ(array(feats, "c").sizes(), (std::vector<int64_t>{20, 64}));
  const auto stored = read_fid_stats(kData + "fid_stats_a.npz");
  const auto deflated = read_fid_stats(kData + "fid_stats_a_compressed.npz");
  EXPECT_TRUE(torch::equal(stored.mu, deflated.mu));
  EXPECT_TRUE(torch::equal(stored.sigma, deflated.sigma));
  // Our statistics of the same features equal NumPy's cov (float64); NumPy's mean of float32
  // activations is float32 (pytorch-fid keeps it so), ours is float64.
  const auto ours = fid_stats_from_features(array(feats, "a"));
  EXPECT_LT(rel(ours.mu, stored.mu), 1e-6);
  EXPECT_LT(rel(ours.sigma, stored.sigma), 1e-12);
}

TEST(Npz, WriteReadRoundTrip) {
  const std::string path = "/tmp/microdit_npz_" + std::to_string(::getpid()) + ".npz";
  auto a = torch::randn({3, 5}, torch::kDouble);
  auto b = torch::arange(7, torch::kInt64);
  auto c = torch::randn({2, 3}).t();  // non-contiguous
  write_npz(path, {{"a", a}, {"b", b}, {"c", c}, {"s", torch::tensor(2.5)}});
  const auto r = read_npz(path);
  ::unlink(path.c_str());
  ASSERT_EQ(r.size(), 4u);
  EXPECT_TRUE(torch::equal(array(r, "a"), a));
  EXPECT_TRUE(torch::equal(array(r, "b"), b));
  EXPECT_TRUE(torch::equal(array(r, "c"), c));
  EXPECT_EQ(array(r, "s").dim(), 0);
  // The header is padded so the data starts on a 64-byte boundary, as NumPy writes it.
  EXPECT_EQ((to_npy(a).size() - size_t(a.numel()) * 8) % 64, 0u);
}

TEST(Npz, FortranOrderAndErrors) {
  std::string npy = to_npy(torch::arange(6, torch::kFloat).view({2, 3}));
  const auto p = npy.find("False");
  npy.replace(p, 5, "True ");
  auto t = parse_npy(npy, "x.npy");  // the same bytes read column-major
  EXPECT_TRUE(torch::equal(t, torch::arange(6, torch::kFloat).view({3, 2}).t()));
  using test_util::error_of;
  EXPECT_NE(error_of([&] { parse_npy("hello", "x.npy"); }).find("x.npy: not a .npy array"), std::string::npos);
  EXPECT_NE(error_of([&] { parse_npy(npy.substr(0, npy.size() - 4), "x.npy"); }).find("header promises"),
            std::string::npos);
  EXPECT_NE(error_of([] { read_npz("/nonexistent.npz"); }).find("/nonexistent.npz"), std::string::npos);
  EXPECT_NE(error_of([] { read_npz(kData + "fid_expected.json"); }).find("not a .npz file"), std::string::npos);
  // A flipped byte in the data: the CRC catches it.
  std::ifstream in(kData + "fid_stats_a.npz", std::ios::binary);
  std::string z((std::istreambuf_iterator<char>(in)), {});
  z[2000] = char(z[2000] ^ 0x40);
  const std::string bad = "/tmp/microdit_npz_bad_" + std::to_string(::getpid()) + ".npz";
  std::ofstream(bad, std::ios::binary) << z;
  const auto err = error_of([&] { read_npz(bad); });
  ::unlink(bad.c_str());
  EXPECT_NE(err.find("CRC mismatch"), std::string::npos) << err;
}

TEST(Fid, FrechetDistanceMatchesPytorchFid) {
  const auto feats = read_npz(kData + "fid_features.npz");
  for (const auto& [name, x, y] : {std::tuple{"ab", "a", "b"}, std::tuple{"cd", "c", "d"}}) {
    const double d = frechet_distance(fid_stats_from_features(array(feats, x)), fid_stats_from_features(array(feats, y)));
    const double want = expected_distance(name);
    EXPECT_NEAR(d, want, 1e-6 * want) << name;
  }
  // Same statistics: zero (up to rounding); symmetric.
  const auto a = fid_stats_from_features(array(feats, "a")), b = fid_stats_from_features(array(feats, "b"));
  EXPECT_NEAR(frechet_distance(a, a), 0.0, 1e-9);
  EXPECT_NEAR(frechet_distance(a, b), frechet_distance(b, a), 1e-9);
}

TEST(Fid, StatsFileRoundTripAndDimensionErrors) {
  const auto a = read_fid_stats(kData + "fid_stats_a.npz");
  const std::string path = "/tmp/microdit_fid_stats_" + std::to_string(::getpid()) + ".npz";
  write_fid_stats(path, a);
  const auto r = read_fid_stats(path);
  ::unlink(path.c_str());
  EXPECT_TRUE(torch::equal(r.mu, a.mu));
  EXPECT_TRUE(torch::equal(r.sigma, a.sigma));
  FidStats small{a.mu.slice(0, 0, 10), a.sigma.slice(0, 0, 10).slice(1, 0, 10)};
  using test_util::error_of;
  EXPECT_NE(error_of([&] { frechet_distance(a, small); }).find("different dimensions: 64 and 10"), std::string::npos);
  EXPECT_NE(error_of([] { read_fid_stats(kData + "fid_features.npz"); }).find("needs arrays 'mu' and 'sigma'"),
            std::string::npos);
  EXPECT_NE(error_of([] { fid_stats_from_features(torch::zeros({1, 4})); }).find("at least 2 images"),
            std::string::npos);
}

TEST(FidInception, RejectsOtherWeightFiles) {
  const auto err = test_util::error_of([] { load_fid_inception(kData + "text_misshaped_clip.safetensors"); });
  EXPECT_NE(err.find("not an FID Inception-v3 weight file"), std::string::npos) << err;
}

// Random-weight parity with pytorch-fid: weights (zip and legacy torch.save, safetensors), PNGs and pytorch-fid's features are made by
// tools/make_fid_fixtures.py in the build folder (about 180 MB, kept for reruns).
TEST(FidInception, FeaturesMatchPytorchFid) {
  const std::string py = std::string(microdit::test_util::source_dir()) + "/.venv/bin/python";
  const std::string dir = test_util::build_dir() + "/fid_inception_fixture";
  if (!is_regular_file(dir + "/fid_inception_random_legacy.pth")) {
    if (!is_regular_file(py) || std::system((py + " -c 'import pytorch_fid' 2>/dev/null").c_str()) != 0)
      GTEST_SKIP() << "pytorch-fid is not installed in " << py << " (scripts/setup_data.sh installs it)";
    const std::string cmd = py + " " + microdit::test_util::source_dir() + "/tools/make_fid_fixtures.py inception " + dir + " >/dev/null 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }
  const auto want = array(read_npz(dir + "/fid_inception_features.npz"), "features");
  ASSERT_EQ(want.sizes(), (std::vector<int64_t>{4, 2048}));
  std::vector<std::string> files;
  for (int i = 0; i < 4; ++i) files.push_back(dir + "/img_" + std::to_string(i) + ".png");
  for (const char* w : {"fid_inception_random.pth", "fid_inception_random.safetensors",
                        "fid_inception_random_legacy.pth"}) {
    auto net = load_fid_inception(dir + "/" + w);
    const auto got = inception_features(*net, files, 3, c10::kCPU);
    EXPECT_LT(rel(got, want), 1e-4) << w;
    EXPECT_LT((got - want).abs().max().item<double>(), 1e-4 * want.abs().max().item<double>()) << w;
  }
  // A cut legacy file: one line naming the problem.
  std::ifstream in(dir + "/fid_inception_random_legacy.pth", std::ios::binary);
  std::string head(200000, '\0');
  in.read(head.data(), long(head.size()));
  const std::string cut = "/tmp/microdit_fid_cut_" + std::to_string(::getpid()) + ".pth";
  std::ofstream(cut, std::ios::binary) << head;
  const auto err = test_util::error_of([&] { load_fid_inception(cut); });
  ::unlink(cut.c_str());
  EXPECT_NE(err.find("truncated"), std::string::npos) << err;
}
