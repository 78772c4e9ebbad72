#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "core/error.h"
#include "core/fs.h"
#include "data/image.h"

#include "test_util.h"

using namespace microdit;
using microdit::test_util::error_of;
using microdit::test_util::TempDir;

namespace {

Image gradient(int w, int h) {
  Image im(w, h);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* p = im.at(x, y);
      p[0] = static_cast<uint8_t>(x * 255 / std::max(1, w - 1));
      p[1] = static_cast<uint8_t>(y * 255 / std::max(1, h - 1));
      p[2] = static_cast<uint8_t>((x * 7 + y * 13) % 256);
    }
  return im;
}

}  // namespace

TEST(Image, PngRoundTripIsExact) {
  TempDir dir;
  const Image im = gradient(37, 21);
  write_png(dir / "a.png", im);
  EXPECT_FALSE(is_regular_file(dir / "a.png.tmp." + std::to_string(::getpid())));
  const Image back = read_png(dir / "a.png");
  EXPECT_EQ(back.width, 37);
  EXPECT_EQ(back.height, 21);
  EXPECT_EQ(back.pixels, im.pixels);
}

TEST(Image, CheckerboardDownscalesToGrey) {
  Image board(4, 4);
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 4; ++x) {
      const uint8_t v = (x + y) % 2 ? 255 : 0;
      std::fill(board.at(x, y), board.at(x, y) + 3, v);
    }
  const Image half = resize(board, 2, 2);
  ASSERT_EQ(half.width, 2);
  for (uint8_t v : half.pixels) EXPECT_EQ(v, 128);  // 127.5 rounded
  const Image one = resize(board, 1, 1);
  for (uint8_t v : one.pixels) EXPECT_EQ(v, 128);
}

TEST(Image, AreaAveragingHandlesFractionalRatios) {
  // 3 -> 2 pixels: each output covers 1.5 source pixels.
  Image row(3, 1);
  const uint8_t vals[3] = {0, 90, 180};
  for (int x = 0; x < 3; ++x) std::fill(row.at(x, 0), row.at(x, 0) + 3, vals[x]);
  const Image out = resize(row, 2, 1);
  EXPECT_EQ(out.at(0, 0)[0], 30);   // (0 * 1 + 90 * 0.5) / 1.5
  EXPECT_EQ(out.at(1, 0)[0], 150);  // (90 * 0.5 + 180 * 1) / 1.5
  // A flat image stays flat whatever the size.
  const Image flat(50, 40, Rgb{10, 200, 77});
  for (auto [w, h] : {std::pair{7, 3}, std::pair{50, 40}, std::pair{123, 99}}) {
    const Image r = resize(flat, w, h);
    for (int i = 0; i < w * h; ++i) {
      EXPECT_EQ(r.pixels[i * 3], 10);
      EXPECT_EQ(r.pixels[i * 3 + 1], 200);
      EXPECT_EQ(r.pixels[i * 3 + 2], 77);
    }
  }
}

TEST(Image, AlphaCompositesOnWhite) {
  RgbaImage rgba{2, 1, false, {255, 0, 0, 128, 0, 0, 255, 0}};
  Image out = composite_on_white(rgba);
  EXPECT_EQ(out.at(0, 0)[0], 255);
  EXPECT_EQ(out.at(0, 0)[1], 127);  // half red on white
  EXPECT_EQ(out.at(1, 0)[2], 255);  // transparent: white
  EXPECT_EQ(out.at(1, 0)[0], 255);
  rgba.premultiplied = true;
  rgba.pixels = {128, 0, 0, 128, 0, 0, 0, 0};
  out = composite_on_white(rgba);
  EXPECT_EQ(out.at(0, 0)[0], 255);
  EXPECT_EQ(out.at(0, 0)[1], 127);
}

TEST(Image, GridLayout) {
  std::vector<Image> ims(7, Image(10, 8, kBlack));
  ims[3] = Image(6, 4, kBlack);  // smaller images are centred in their cell
  const Image g = make_grid(ims, 3, 2);
  EXPECT_EQ(g.width, 3 * 10 + 4 * 2);
  EXPECT_EQ(g.height, 3 * 8 + 4 * 2);
  EXPECT_EQ(g.at(0, 0)[0], 255);  // margin
  EXPECT_EQ(g.at(2, 2)[0], 0);    // first image
  EXPECT_EQ(g.at(2, 12)[0], 255);  // the small image's cell, outside the image
  EXPECT_EQ(g.at(5, 14)[0], 0);    // inside it
  EXPECT_EQ(g.at(g.width - 3, g.height - 3)[0], 255);  // the empty last cells
  EXPECT_NE(error_of([] { make_grid({}, 3); }), "");
}

TEST(Image, PadToSquareCentres) {
  const Image sq = pad_to_square(Image(4, 2, kBlack), 6);
  EXPECT_EQ(sq.width, 6);
  EXPECT_EQ(sq.at(1, 2)[0], 0);
  EXPECT_EQ(sq.at(0, 2)[0], 255);
  EXPECT_EQ(sq.at(1, 1)[0], 255);
}

TEST(Image, TensorConversionsUseMinusOneToOne) {
  const Image im = gradient(5, 3);
  const auto t = image_to_tensor(im);
  EXPECT_EQ(t.sizes(), (std::vector<int64_t>{3, 3, 5}));
  EXPECT_EQ(t.scalar_type(), torch::kFloat32);
  EXPECT_NEAR(t[0][0][0].item<float>(), -1.0f, 1e-6);
  EXPECT_NEAR(t[0][0][4].item<float>(), 1.0f, 1e-6);
  EXPECT_EQ(tensor_to_image(t).pixels, im.pixels);
  const Image clamped = tensor_to_image(torch::full({3, 2, 2}, 3.0));
  EXPECT_EQ(clamped.at(1, 1)[0], 255);
  EXPECT_NE(error_of([] { tensor_to_image(torch::zeros({2, 2})); }).find("(3, H, W)"), std::string::npos);
}

TEST(Image, BatchesConvertAndEnlargeForGrids) {
  const auto t = image_to_tensor(gradient(5, 3));
  const auto ims = tensor_to_images(torch::stack({t, t}), 3);
  ASSERT_EQ(ims.size(), 2u);
  EXPECT_EQ(ims[1].width, 15);
  EXPECT_EQ(ims[1].height, 9);
  EXPECT_EQ(tensor_to_images(t.unsqueeze(0))[0].pixels, gradient(5, 3).pixels);  // scale 1: as is
  EXPECT_NE(error_of([&] { tensor_to_images(t); }).find("(B, 3, H, W)"), std::string::npos);
  EXPECT_NE(error_of([&] { tensor_to_images(t.unsqueeze(0), 0); }).find("scale must be >= 1"), std::string::npos);
}

TEST(Image, PlotDrawsLines) {
  PlotSeries s{{0, 1, 2, 3, 4}, {1.0, 0.5, 0.3, 0.2, 0.15}, Rgb{255, 0, 0}, "train"};
  PlotOptions o;
  o.width = 320, o.height = 200, o.log_y = true, o.title = "loss";
  const Image im = plot_lines({s}, o);
  EXPECT_EQ(im.width, 320);
  int red = 0;
  for (int i = 0; i < im.width * im.height; ++i)
    red += im.pixels[i * 3] > 200 && im.pixels[i * 3 + 1] < 80 && im.pixels[i * 3 + 2] < 80;
  EXPECT_GT(red, 200);  // the polyline is there
  // Degenerate input still gives a plot, not an error.
  PlotSeries lone;
  lone.x = {1}, lone.y = {2};
  EXPECT_EQ(plot_lines({lone}, o).height, 200);
  EXPECT_EQ(plot_lines({}, o).height, 200);
}

TEST(Image, BadFilesGiveOneLineErrors) {
  TempDir dir;
  EXPECT_NE(error_of([&] { read_png(dir / "missing.png"); }).find("no such file"), std::string::npos);
  std::ofstream(dir / "empty.png").flush();
  EXPECT_NE(error_of([&] { read_png(dir / "empty.png"); }).find("empty file"), std::string::npos);
  std::ofstream(dir / "text.png") << "this is not a png file at all";
  EXPECT_NE(error_of([&] { read_png(dir / "text.png"); }).find("not a readable PNG"), std::string::npos);
  // A truncated PNG: the header parses, the pixel data does not.
  write_png(dir / "full.png", gradient(64, 64));
  std::ifstream in(dir / "full.png", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  std::ofstream(dir / "cut.png", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  const std::string cut = error_of([&] { read_png(dir / "cut.png"); });
  EXPECT_NE(cut.find("cut.png"), std::string::npos) << cut;
  EXPECT_EQ(cut.find('\n'), std::string::npos);
  EXPECT_NE(error_of([&] { write_png(dir / "no/such/dir/x.png", gradient(2, 2)); }).find("cannot open"),
            std::string::npos);
}
