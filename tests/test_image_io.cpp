// Image decoding and the reference's preprocessing against Pillow 13 / torchvision outputs
// recorded by tools/make_image_fixtures.py in tests/data/img_*.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <zlib.h>

#include <cstdint>
#include <cmath>
#include <cstring>
#include <tuple>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>

#include "core/error.h"
#include "data/image_io.h"
#include "test_util.h"

using namespace microdit;
using microdit::test_util::error_of;

namespace {

const std::string kData = std::string(microdit::test_util::source_dir()) + "/tests/data/";

nlohmann::json fixtures() {
  std::ifstream f(kData + "img_fixtures.json");
  EXPECT_TRUE(f.good()) << "missing " << kData << "img_fixtures.json";
  return nlohmann::json::parse(f);
}

uint32_t crc(const void* data, size_t n) {
  return static_cast<uint32_t>(crc32(0L, static_cast<const Bytef*>(data), static_cast<uInt>(n)));
}

// The splitmix64 bytes of make_image_fixtures.py: top byte of mix(seed + (i + 1) * golden).
Image noise_image(int w, int h, uint64_t seed) {
  Image im;
  im.width = w;
  im.height = h;
  im.pixels.resize(static_cast<size_t>(w) * h * 3);
  for (size_t i = 0; i < im.pixels.size(); ++i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    im.pixels[i] = static_cast<uint8_t>(z >> 56);
  }
  return im;
}

int max_abs_diff(const Image& a, const Image& b) {
  int m = 0;
  for (size_t i = 0; i < a.pixels.size(); ++i) m = std::max(m, std::abs(a.pixels[i] - b.pixels[i]));
  return m;
}

}  // namespace

TEST(ImageIo, ReferencePreprocessMatchesTorchvisionExactly) {
  const auto fx = fixtures();
  ASSERT_GE(fx["preprocess"].size(), 10u);
  for (const auto& c : fx["preprocess"]) {
    const int w = c["width"], h = c["height"], s = c["size"];
    SCOPED_TRACE(fmt::format("{}x{} -> {}", w, h, s));
    const Image img = noise_image(w, h, c["seed"].get<uint64_t>());
    const Image crop = reference_resize_crop(img, s);
    ASSERT_EQ(crop.width, s);
    ASSERT_EQ(crop.height, s);
    EXPECT_EQ(crc(crop.pixels.data(), crop.pixels.size()), c["crc_u8"].get<uint32_t>());
    const auto t = reference_preprocess(img, s);
    ASSERT_EQ(t.sizes(), (std::vector<int64_t>{3, s, s}));
    ASSERT_EQ(t.scalar_type(), torch::kFloat32);
    EXPECT_EQ(crc(t.data_ptr<float>(), t.numel() * 4), c["crc_f32"].get<uint32_t>());
  }
}

TEST(ImageIo, PreprocessRangeAndCrop) {
  // 341 wide, 600 high at 256: resized to 256 x int(256 * 600 / 341) = 256 x 450, top = 97.
  const Image img = noise_image(341, 600, 3);
  const auto t = reference_preprocess(img, 256);
  EXPECT_GE(t.min().item<float>(), -1.0f);
  EXPECT_LE(t.max().item<float>(), 1.0f);
  EXPECT_EQ(reference_to_tensor(Image(2, 2, kBlack)).min().item<float>(), -1.0f);
  EXPECT_EQ(reference_to_tensor(Image(2, 2, kWhite)).max().item<float>(), 1.0f);
  // An image already at the size is neither resized nor cropped.
  const Image sq = noise_image(256, 256, 4);
  EXPECT_EQ(reference_resize_crop(sq, 256).pixels, sq.pixels);
  // 256 x 300 is only cropped: top = round(44 / 2) = 22.
  const Image tall = noise_image(256, 300, 5);
  const Image c = reference_resize_crop(tall, 256);
  EXPECT_EQ(std::vector<uint8_t>(c.at(0, 0), c.at(0, 0) + 256 * 3),
            std::vector<uint8_t>(tall.at(0, 22), tall.at(0, 22) + 256 * 3));
  // 256 x 301: round(22.5) = 22 (half to even); 256 x 303: round(23.5) = 24.
  const Image t301 = noise_image(256, 301, 6), t303 = noise_image(256, 303, 7);
  EXPECT_EQ(reference_resize_crop(t301, 256).pixels[0], t301.at(0, 22)[0]);
  const Image c303 = reference_resize_crop(t303, 256);
  EXPECT_EQ(std::vector<uint8_t>(t303.at(0, 24), t303.at(0, 24) + 768),
            std::vector<uint8_t>(c303.pixels.begin(), c303.pixels.begin() + 768));
}

TEST(ImageIo, CropWindowEqualsFullResizeThenCrop) {
  // reference_resize_crop computes only the crop window of the resize: same pixels.
  for (auto [w, h, s] : {std::tuple{9, 200, 64}, {200, 9, 64}, {100, 77, 50}, {33, 34, 64}}) {
    const Image img = noise_image(w, h, 11);
    const int nw = w <= h ? s : static_cast<int>(static_cast<double>(s) * w / h);
    const int nh = w <= h ? static_cast<int>(static_cast<double>(s) * h / w) : s;
    const Image full = pil_resize_bicubic(img, nw, nh);
    auto half_even = [](int d) { return static_cast<int>(std::nearbyint(d / 2.0)); };  // FE_TONEAREST
    const int left = half_even(nw - s), top = half_even(nh - s);
    const Image crop = reference_resize_crop(img, s);
    for (int y = 0; y < s; ++y)
      ASSERT_EQ(std::memcmp(crop.at(0, y), full.at(left, top + y), static_cast<size_t>(s) * 3), 0)
          << w << "x" << h << " row " << y;
  }
  // A very elongated image only costs its window: 1 x 30000 -> 512 x 15,360,000, cropped.
  const Image thin = noise_image(1, 30000, 12);
  const Image c = reference_resize_crop(thin, 512);
  EXPECT_EQ(c.width, 512);
  EXPECT_EQ(c.height, 512);
}

TEST(ImageIo, BicubicKeepsConstantsAndSize) {
  const Image grey(37, 23, Rgb{77, 130, 201});
  for (auto [w, h] : {std::pair{100, 60}, {10, 5}, {37, 50}, {80, 23}, {1, 1}}) {
    const Image r = pil_resize_bicubic(grey, w, h);
    ASSERT_EQ(r.width, w);
    ASSERT_EQ(r.height, h);
    EXPECT_EQ(max_abs_diff(r, Image(w, h, Rgb{77, 130, 201})), 0) << w << "x" << h;
  }
  EXPECT_NE(error_of([&] { pil_resize_bicubic(grey, 0, 5); }), "");
}

TEST(ImageIo, DecodesLikePillow) {
  const auto fx = fixtures();
  ASSERT_GE(fx["decode"].size(), 20u);
  for (const auto& c : fx["decode"]) {
    const std::string file = c["file"];
    SCOPED_TRACE(file + " (Pillow mode " + c["mode"].get<std::string>() + ")");
    Image img;
    ASSERT_EQ(error_of([&] { img = decode_image_file(kData + file); }), "");
    ASSERT_EQ(img.width, c["width"].get<int>());
    ASSERT_EQ(img.height, c["height"].get<int>());
    const Image expected = decode_image_file(kData + c["expected"].get<std::string>());
    ASSERT_EQ(crc(expected.pixels.data(), expected.pixels.size()), c["crc"].get<uint32_t>());
    // Same libjpeg-turbo algorithms (accurate DCT, fancy upsampling) as Pillow's: exact; the
    // issue's bar for JPEG is 1 level (another libjpeg-turbo version could round differently).
    const bool jpeg = file.ends_with(".jpg");
    const int diff = max_abs_diff(img, expected);
    EXPECT_LE(diff, jpeg ? 1 : 0);
    if (jpeg && diff) std::cout << file << ": max difference " << diff << " grey level\n";
  }
}

TEST(ImageIo, RefusesBadFilesWithOneLine) {
  const auto fx = fixtures();
  ASSERT_GE(fx["refuse"].size(), 6u);
  for (const auto& c : fx["refuse"]) {
    const std::string file = c["file"];
    SCOPED_TRACE(file);
    const std::string err = error_of([&] { decode_image_file(kData + file); });
    EXPECT_TRUE(std::regex_search(err, std::regex(c["error"].get<std::string>()))) << err;
    EXPECT_EQ(err.rfind(kData + file, 0), 0u) << err;  // names the file first
    EXPECT_EQ(err.find('\n'), std::string::npos) << err;
  }
  EXPECT_NE(error_of([&] { decode_image_file(kData + "no_such_image.jpg"); }).find("no such file"),
            std::string::npos);
  // Damaged files: decoded or refused, never a crash.
  std::mt19937 rng(3);
  for (const char* name : {"img_420.jpg", "img_progressive.jpg", "img_cmyk.jpg", "img_rgb.png",
                           "img_palette.png", "img_lossy.webp", "img_lossless.webp", "img_anim.webp"}) {
    std::ifstream f(kData + name, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    for (int trial = 0; trial < 40; ++trial) {
      std::string b = bytes;
      for (int k = 0; k < 1 + trial % 3; ++k) b[rng() % b.size()] = static_cast<char>(rng());
      try {
        decode_image_bytes(b, name);
      } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()).rfind(name, 0), 0u) << e.what();
      }
    }
  }
  // Every prefix of a JPEG and a PNG: decoded or refused, never a crash.
  for (const char* name : {"img_420.jpg", "img_rgb.png", "img_lossy.webp", "img_interlaced.png"}) {
    std::ifstream f(kData + name, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    for (size_t n = 0; n < bytes.size(); n += std::max<size_t>(1, bytes.size() / 97)) {
      try {
        decode_image_bytes(bytes.substr(0, n), name);
      } catch (const Error&) {
      }
    }
  }
}
