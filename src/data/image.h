// 8-bit RGB images and the few operations the data pipeline and reports need: PNG files,
// alpha compositing on white, filtered resizing, grids of samples, loss-curve plots and
// conversion to and from the (3, H, W) float tensors in [-1, 1] the EDM settings expect.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace microdit {

using Rgb = std::array<uint8_t, 3>;
inline constexpr Rgb kWhite{255, 255, 255};
inline constexpr Rgb kBlack{0, 0, 0};

// Rows top to bottom, pixels interleaved R, G, B.
struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> pixels;  // height * width * 3

  Image() = default;
  Image(int w, int h, Rgb fill = kWhite);
  uint8_t* at(int x, int y) { return pixels.data() + (static_cast<size_t>(y) * width + x) * 3; }
  const uint8_t* at(int x, int y) const {
    return pixels.data() + (static_cast<size_t>(y) * width + x) * 3;
  }
  bool empty() const { return width == 0 || height == 0; }
};

// Rows top to bottom, pixels interleaved R, G, B, A. Premultiplied when `premultiplied`
// (colour bitmaps from FreeType), straight alpha otherwise (PNG files).
struct RgbaImage {
  int width = 0, height = 0;
  bool premultiplied = false;
  std::vector<uint8_t> pixels;  // height * width * 4
};

// PNG files. Writing goes through a temporary file renamed over the target, so a reader
// never sees half a file. Reading composites any alpha channel on white; a missing, empty
// or non-PNG file is a microdit::Error naming the path.
void write_png(const std::string& path, const Image& image);
std::string encode_png(const Image& image);  // the PNG file's bytes
Image read_png(const std::string& path);
RgbaImage read_png_rgba(const std::string& path);

Image composite_on_white(const RgbaImage& image);

// Resizes with proper filtering: exact area averaging (a box filter weighted by overlap)
// along each axis that shrinks, linear interpolation along one that grows.
Image resize(const Image& image, int width, int height);

// Places `image` centred on a `side` x `side` canvas of `fill` (the image must fit).
Image pad_to_square(const Image& image, int side, Rgb fill = kWhite);

// Images in rows of `cols` cells, each cell the size of the largest image (smaller ones are
// centred), with `margin` pixels of `background` around and between cells.
Image make_grid(const std::vector<Image>& images, int cols, int margin = 2,
                Rgb background = kWhite);

// Text in DejaVu Sans (Debian fonts-dejavu-core), `px` pixels high, top-left at (x, y).
// Returns false, drawing nothing, when the font file is not installed.
bool draw_text(Image& image, int x, int y, const std::string& utf8, int px, Rgb color = kBlack);

struct PlotSeries {
  std::vector<double> x, y;
  Rgb color{31, 119, 180};
  std::string label;  // shown in a legend when non-empty
};
struct PlotOptions {
  int width = 800, height = 500;
  bool log_y = false;  // for loss curves; non-positive values are skipped
  std::string title, x_label, y_label;
  float line_width = 1.5f;
};
// Polylines on a white canvas with axes, "nice" tick marks and, when DejaVu Sans is
// installed, tick labels, axis labels, a title and a legend.
Image plot_lines(const std::vector<PlotSeries>& series, const PlotOptions& options = {});

// (3, H, W) float32 in [-1, 1]: v / 127.5 - 1. The inverse clamps and rounds.
at::Tensor image_to_tensor(const Image& image);
Image tensor_to_image(const at::Tensor& chw);
// (B, 3, H, W) -> B images, each enlarged `scale` times (for sample grids).
std::vector<Image> tensor_to_images(const at::Tensor& bchw, int scale = 1);

}  // namespace microdit
