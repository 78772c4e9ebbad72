#include "data/image.h"

#include <ft2build.h>
#include FT_FREETYPE_H
#include <png.h>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>

#include "core/error.h"
#include "core/fs.h"
#include "io/atomic_file.h"

namespace microdit {

Image::Image(int w, int h, Rgb fill) : width(w), height(h) {
  MD_CHECK(w >= 0 && h >= 0, "image size {}x{} is negative", w, h);
  pixels.resize(static_cast<size_t>(w) * h * 3);
  for (size_t i = 0; i < pixels.size(); i += 3) std::copy(fill.begin(), fill.end(), &pixels[i]);
}

// ---- PNG files ----------------------------------------------------------------------

namespace {

std::string read_bytes(const std::string& path) {
  MD_CHECK(is_regular_file(path), "{}: no such file", path);
  std::ifstream in(path, std::ios::binary);
  MD_CHECK(in.good(), "{}: cannot open ({})", path, std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MD_CHECK(!in.bad(), "{}: read failed", path);
  return bytes;
}

}  // namespace

std::string encode_png(const Image& image) {
  MD_CHECK(!image.empty(), "cannot encode an empty {}x{} image as PNG", image.width, image.height);
  MD_CHECK(image.pixels.size() == static_cast<size_t>(image.width) * image.height * 3,
           "image buffer does not match its {}x{} size", image.width, image.height);
  png_image png{};
  png.version = PNG_IMAGE_VERSION;
  png.width = static_cast<png_uint_32>(image.width);
  png.height = static_cast<png_uint_32>(image.height);
  png.format = PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  MD_CHECK(png_image_write_to_memory(&png, nullptr, &size, 0, image.pixels.data(), 0, nullptr),
           "PNG encoding failed ({})", png.message);
  std::string bytes(size, '\0');
  MD_CHECK(png_image_write_to_memory(&png, bytes.data(), &size, 0, image.pixels.data(), 0, nullptr),
           "PNG encoding failed ({})", png.message);
  bytes.resize(size);
  return bytes;
}

void write_png(const std::string& path, const Image& image) {
  std::string bytes;
  try {
    bytes = encode_png(image);
  } catch (const Error& e) {
    fail("{}: {}", path, e.what());
  }
  AtomicFile out(path);
  out.write(bytes.data(), bytes.size());
  out.commit();
}

RgbaImage read_png_rgba(const std::string& path) {
  const std::string bytes = read_bytes(path);
  MD_CHECK(!bytes.empty(), "{}: empty file, not a PNG image", path);
  png_image png{};
  png.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&png, bytes.data(), bytes.size()))
    fail("{}: not a readable PNG image ({})", path, png.message);
  const uint64_t pixels = uint64_t{png.width} * png.height;
  if (pixels == 0 || pixels > (uint64_t{1} << 28)) {
    png_image_free(&png);
    fail("{}: PNG image of {}x{} pixels is out of range", path, png.width, png.height);
  }
  png.format = PNG_FORMAT_RGBA;
  RgbaImage out;
  out.width = static_cast<int>(png.width);
  out.height = static_cast<int>(png.height);
  out.pixels.resize(PNG_IMAGE_SIZE(png));
  if (!png_image_finish_read(&png, nullptr, out.pixels.data(), 0, nullptr))
    fail("{}: corrupt PNG image ({})", path, png.message);
  return out;
}

Image read_png(const std::string& path) { return composite_on_white(read_png_rgba(path)); }

Image composite_on_white(const RgbaImage& image) {
  MD_CHECK(image.pixels.size() == static_cast<size_t>(image.width) * image.height * 4,
           "RGBA buffer does not match its {}x{} size", image.width, image.height);
  Image out(image.width, image.height);
  const size_t n = static_cast<size_t>(image.width) * image.height;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* s = &image.pixels[i * 4];
    const int a = s[3];
    for (int c = 0; c < 3; ++c) {
      const int v = image.premultiplied ? s[c] + (255 - a)
                                        : (s[c] * a + 255 * (255 - a) + 127) / 255;
      out.pixels[i * 3 + c] = static_cast<uint8_t>(std::clamp(v, 0, 255));
    }
  }
  return out;
}

// ---- resizing -------------------------------------------------------------------------

namespace {

// The source pixels and weights that make one output pixel along one axis.
struct Taps {
  int first = 0;
  std::vector<float> weights;
};

std::vector<Taps> axis_taps(int in, int out) {
  std::vector<Taps> taps(out);
  const double scale = static_cast<double>(in) / out;
  for (int i = 0; i < out; ++i) {
    Taps& t = taps[i];
    if (out < in) {  // area average over the source interval [a, b)
      const double a = i * scale, b = (i + 1) * scale;
      t.first = static_cast<int>(std::floor(a));
      const int last = std::min(in, static_cast<int>(std::ceil(b)));
      for (int j = t.first; j < last; ++j)
        t.weights.push_back(static_cast<float>((std::min(b, j + 1.0) - std::max(a, double(j))) / scale));
    } else {  // linear interpolation between pixel centres, edges clamped
      const double centre = std::clamp((i + 0.5) * scale - 0.5, 0.0, in - 1.0);
      t.first = std::min(static_cast<int>(std::floor(centre)), in - 1);
      const float frac = static_cast<float>(centre - t.first);
      t.weights.push_back(1.0f - frac);
      if (t.first + 1 < in && frac > 0) t.weights.push_back(frac);
    }
  }
  return taps;
}

}  // namespace

Image resize(const Image& image, int width, int height) {
  MD_CHECK(!image.empty(), "cannot resize an empty image");
  MD_CHECK(width > 0 && height > 0, "cannot resize to {}x{}", width, height);
  if (width == image.width && height == image.height) return image;
  const auto tx = axis_taps(image.width, width), ty = axis_taps(image.height, height);
  // Horizontal pass into floats (height_in x width_out x 3), then the vertical pass.
  std::vector<float> mid(static_cast<size_t>(image.height) * width * 3);
  for (int y = 0; y < image.height; ++y)
    for (int x = 0; x < width; ++x) {
      float acc[3] = {0, 0, 0};
      const Taps& t = tx[x];
      for (size_t k = 0; k < t.weights.size(); ++k) {
        const uint8_t* p = image.at(t.first + static_cast<int>(k), y);
        for (int c = 0; c < 3; ++c) acc[c] += t.weights[k] * p[c];
      }
      std::copy(acc, acc + 3, &mid[(static_cast<size_t>(y) * width + x) * 3]);
    }
  Image out(width, height);
  for (int y = 0; y < height; ++y) {
    const Taps& t = ty[y];
    for (int x = 0; x < width; ++x) {
      float acc[3] = {0, 0, 0};
      for (size_t k = 0; k < t.weights.size(); ++k) {
        const float* p = &mid[((t.first + k) * width + x) * 3];
        for (int c = 0; c < 3; ++c) acc[c] += t.weights[k] * p[c];
      }
      for (int c = 0; c < 3; ++c)
        out.at(x, y)[c] = static_cast<uint8_t>(std::clamp(std::lround(acc[c]), 0L, 255L));
    }
  }
  return out;
}

// ---- layout ---------------------------------------------------------------------------

namespace {

void blit(Image& dst, const Image& src, int x0, int y0) {
  for (int y = 0; y < src.height; ++y)
    std::memcpy(dst.at(x0, y0 + y), src.at(0, y), static_cast<size_t>(src.width) * 3);
}

}  // namespace

Image pad_to_square(const Image& image, int side, Rgb fill) {
  MD_CHECK(image.width <= side && image.height <= side, "a {}x{} image does not fit in {}x{}",
           image.width, image.height, side, side);
  Image out(side, side, fill);
  blit(out, image, (side - image.width) / 2, (side - image.height) / 2);
  return out;
}

Image make_grid(const std::vector<Image>& images, int cols, int margin, Rgb background) {
  MD_CHECK(!images.empty(), "a grid needs at least one image");
  MD_CHECK(cols >= 1 && margin >= 0, "a grid needs cols >= 1 and margin >= 0");
  cols = std::min<int>(cols, static_cast<int>(images.size()));
  const int rows = (static_cast<int>(images.size()) + cols - 1) / cols;
  int cw = 0, ch = 0;
  for (const auto& im : images) cw = std::max(cw, im.width), ch = std::max(ch, im.height);
  Image out(cols * cw + (cols + 1) * margin, rows * ch + (rows + 1) * margin, background);
  for (size_t i = 0; i < images.size(); ++i) {
    const int r = static_cast<int>(i) / cols, c = static_cast<int>(i) % cols;
    const Image& im = images[i];
    blit(out, im, margin + c * (cw + margin) + (cw - im.width) / 2,
         margin + r * (ch + margin) + (ch - im.height) / 2);
  }
  return out;
}

// ---- text -----------------------------------------------------------------------------

namespace {

constexpr const char* kTextFont = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

std::vector<char32_t> decode_utf8(const std::string& s) {
  std::vector<char32_t> out;
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    const int n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) {
      out.push_back(U'?');
      ++i;
      continue;
    }
    char32_t cp = n == 1 ? b : b & (0x7F >> n);
    for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out.push_back(cp);
    i += n;
  }
  return out;
}

// One FreeType face for labels, opened on first use; nullptr when the font is missing.
struct TextFont {
  FT_Library lib = nullptr;
  FT_Face face = nullptr;
  std::mutex mutex;
  TextFont() {
    if (!is_regular_file(kTextFont) || FT_Init_FreeType(&lib) != 0) return;
    if (FT_New_Face(lib, kTextFont, 0, &face) != 0) face = nullptr;
  }
  ~TextFont() {
    if (face) FT_Done_Face(face);
    if (lib) FT_Done_FreeType(lib);
  }
};

TextFont& text_font() {
  static TextFont font;
  return font;
}

// Draws (when `image` is non-null) and measures a line of text; returns its advance width.
int render_text(Image* image, int x, int y, const std::string& utf8, int px, Rgb color) {
  TextFont& f = text_font();
  if (!f.face) return -1;
  std::lock_guard lock(f.mutex);
  FT_Set_Pixel_Sizes(f.face, 0, static_cast<FT_UInt>(px));
  const int baseline = y + static_cast<int>(f.face->size->metrics.ascender >> 6);
  int pen = x;
  for (char32_t cp : decode_utf8(utf8)) {
    if (FT_Load_Char(f.face, cp, FT_LOAD_RENDER) != 0) continue;
    const FT_GlyphSlot g = f.face->glyph;
    if (image) {
      const FT_Bitmap& bm = g->bitmap;
      for (unsigned r = 0; r < bm.rows; ++r)
        for (unsigned c = 0; c < bm.width; ++c) {
          const int px_x = pen + g->bitmap_left + static_cast<int>(c);
          const int px_y = baseline - g->bitmap_top + static_cast<int>(r);
          if (px_x < 0 || px_y < 0 || px_x >= image->width || px_y >= image->height) continue;
          const int a = bm.buffer[r * bm.pitch + c];
          uint8_t* p = image->at(px_x, px_y);
          for (int k = 0; k < 3; ++k) p[k] = static_cast<uint8_t>((color[k] * a + p[k] * (255 - a) + 127) / 255);
        }
    }
    pen += static_cast<int>(g->advance.x >> 6);
  }
  return pen - x;
}

int text_width(const std::string& utf8, int px) { return render_text(nullptr, 0, 0, utf8, px, kBlack); }

}  // namespace

bool draw_text(Image& image, int x, int y, const std::string& utf8, int px, Rgb color) {
  return render_text(&image, x, y, utf8, px, color) >= 0;
}

// ---- plots ----------------------------------------------------------------------------

namespace {

// Anti-aliased line segment of the given width, blended over the image.
void draw_segment(Image& im, double x0, double y0, double x1, double y1, float width, Rgb color) {
  const double r = width / 2.0;
  const int xa = std::max(0, static_cast<int>(std::floor(std::min(x0, x1) - r - 1)));
  const int xb = std::min(im.width - 1, static_cast<int>(std::ceil(std::max(x0, x1) + r + 1)));
  const int ya = std::max(0, static_cast<int>(std::floor(std::min(y0, y1) - r - 1)));
  const int yb = std::min(im.height - 1, static_cast<int>(std::ceil(std::max(y0, y1) + r + 1)));
  const double dx = x1 - x0, dy = y1 - y0, len2 = dx * dx + dy * dy;
  for (int y = ya; y <= yb; ++y)
    for (int x = xa; x <= xb; ++x) {
      const double px = x + 0.5, py = y + 0.5;
      const double t = len2 > 0 ? std::clamp(((px - x0) * dx + (py - y0) * dy) / len2, 0.0, 1.0) : 0.0;
      const double d = std::hypot(px - (x0 + t * dx), py - (y0 + t * dy));
      const double cover = std::clamp(r + 0.5 - d, 0.0, 1.0);
      if (cover <= 0) continue;
      uint8_t* p = im.at(x, y);
      for (int k = 0; k < 3; ++k)
        p[k] = static_cast<uint8_t>(std::lround(color[k] * cover + p[k] * (1 - cover)));
    }
}

void fill_rect(Image& im, int x0, int y0, int x1, int y1, Rgb color) {
  for (int y = std::max(0, y0); y < std::min(im.height, y1); ++y)
    for (int x = std::max(0, x0); x < std::min(im.width, x1); ++x)
      std::copy(color.begin(), color.end(), im.at(x, y));
}

// Tick values covering [lo, hi]: multiples of 1, 2 or 5 x 10^k, about `target` of them.
std::vector<double> nice_ticks(double lo, double hi, int target) {
  const double raw = (hi - lo) / target, mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> ticks;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step)
    ticks.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return ticks;
}

std::string tick_label(double v) { return fmt::format("{:.4g}", v); }

}  // namespace

Image plot_lines(const std::vector<PlotSeries>& series, const PlotOptions& o) {
  MD_CHECK(o.width >= 100 && o.height >= 80, "plot size {}x{} is too small", o.width, o.height);
  const bool text = text_width("0", 12) >= 0;
  Image im(o.width, o.height);
  const int left = text ? 72 : 12, right = 16, top = o.title.empty() || !text ? 14 : 34;
  const int bottom = text ? 46 : 12;
  const int pw = o.width - left - right, ph = o.height - top - bottom;

  auto fy = [&](double v) { return o.log_y ? std::log10(v) : v; };
  auto usable = [&](double x, double y) { return std::isfinite(x) && std::isfinite(y) && (!o.log_y || y > 0); };
  double x_lo = INFINITY, x_hi = -INFINITY, y_lo = INFINITY, y_hi = -INFINITY;
  for (const auto& s : series) {
    MD_CHECK(s.x.size() == s.y.size(), "plot series '{}' has {} x and {} y values", s.label,
             s.x.size(), s.y.size());
    for (size_t i = 0; i < s.x.size(); ++i)
      if (usable(s.x[i], s.y[i])) {
        x_lo = std::min(x_lo, s.x[i]), x_hi = std::max(x_hi, s.x[i]);
        y_lo = std::min(y_lo, fy(s.y[i])), y_hi = std::max(y_hi, fy(s.y[i]));
      }
  }
  if (!(x_lo <= x_hi)) x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;  // nothing to draw: empty axes
  if (x_hi - x_lo < 1e-12) x_lo -= 0.5, x_hi += 0.5;
  if (y_hi - y_lo < 1e-12) y_lo -= 0.5, y_hi += 0.5;
  const double y_pad = (y_hi - y_lo) * 0.04;
  y_lo -= y_pad, y_hi += y_pad;
  auto sx = [&](double x) { return left + (x - x_lo) / (x_hi - x_lo) * pw; };
  auto sy = [&](double v) { return top + ph - (v - y_lo) / (y_hi - y_lo) * ph; };

  const Rgb grid{225, 225, 225}, axis{60, 60, 60};
  // Vertical ticks and grid.
  for (double t : nice_ticks(x_lo, x_hi, 6)) {
    const int x = static_cast<int>(std::lround(sx(t)));
    fill_rect(im, x, top, x + 1, top + ph, grid);
    fill_rect(im, x, top + ph, x + 1, top + ph + 5, axis);
    if (text) {
      const std::string l = tick_label(t);
      draw_text(im, x - text_width(l, 11) / 2, top + ph + 7, l, 11, axis);
    }
  }
  // Horizontal ticks: powers of ten (and 2x, 5x over short ranges) on a log axis.
  std::vector<double> yticks;  // in axis units (log10 when log_y)
  if (o.log_y && y_hi - y_lo >= 1.0) {
    for (double k = std::floor(y_lo); k <= y_hi; ++k)
      for (double m : {1.0, 2.0, 5.0})
        if (const double v = k + std::log10(m); v >= y_lo && v <= y_hi && (m == 1.0 || y_hi - y_lo < 2.5))
          yticks.push_back(v);
  } else if (o.log_y) {
    for (double t : nice_ticks(std::pow(10, y_lo), std::pow(10, y_hi), 5))
      if (t > 0) yticks.push_back(std::log10(t));
  } else {
    yticks = nice_ticks(y_lo, y_hi, 6);
  }
  for (double t : yticks) {
    const int y = static_cast<int>(std::lround(sy(t)));
    fill_rect(im, left, y, left + pw, y + 1, grid);
    fill_rect(im, left - 5, y, left, y + 1, axis);
    if (text) {
      const std::string l = tick_label(o.log_y ? std::pow(10, t) : t);
      draw_text(im, left - 8 - text_width(l, 11), y - 7, l, 11, axis);
    }
  }
  fill_rect(im, left, top, left + 1, top + ph + 1, axis);
  fill_rect(im, left, top + ph, left + pw + 1, top + ph + 1, axis);

  for (const auto& s : series) {
    bool have = false;
    double px = 0, py = 0;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!usable(s.x[i], s.y[i])) {
        have = false;  // a gap in the line
        continue;
      }
      const double x = sx(s.x[i]), y = sy(fy(s.y[i]));
      if (have) draw_segment(im, px, py, x, y, o.line_width, s.color);
      else if (i + 1 == s.x.size() || !usable(s.x[i + 1], s.y[i + 1]))
        draw_segment(im, x, y, x, y, o.line_width + 1, s.color);  // a lone point
      px = x, py = y, have = true;
    }
  }

  if (text) {
    if (!o.title.empty())
      draw_text(im, left + (pw - text_width(o.title, 15)) / 2, 8, o.title, 15, kBlack);
    if (!o.x_label.empty())
      draw_text(im, left + (pw - text_width(o.x_label, 12)) / 2, o.height - 20, o.x_label, 12, kBlack);
    if (!o.y_label.empty()) draw_text(im, 4, top - (o.title.empty() ? 2 : 16), o.y_label, 12, kBlack);
    int ly = top + 8;
    for (const auto& s : series) {
      if (s.label.empty()) continue;
      const int w = text_width(s.label, 12);
      const int x = left + pw - w - 36;
      fill_rect(im, x - 4, ly - 3, left + pw - 6, ly + 17, kWhite);
      draw_segment(im, x, ly + 7, x + 22, ly + 7, 2.5f, s.color);
      draw_text(im, x + 28, ly, s.label, 12, kBlack);
      ly += 20;
    }
  }
  return im;
}

// ---- tensors --------------------------------------------------------------------------

at::Tensor image_to_tensor(const Image& image) {
  MD_CHECK(!image.empty(), "cannot convert an empty image to a tensor");
  auto hwc = torch::from_blob(const_cast<uint8_t*>(image.pixels.data()),
                              {image.height, image.width, 3}, torch::kUInt8);
  return hwc.permute({2, 0, 1}).to(torch::kFloat32).div(127.5).sub(1.0).contiguous();
}

Image tensor_to_image(const at::Tensor& chw) {
  MD_CHECK(chw.dim() == 3 && chw.size(0) == 3, "expected an image tensor of shape (3, H, W), got {}",
           c10::str(chw.sizes()));
  const auto hwc = chw.detach()
                       .to(torch::kCPU, torch::kFloat32)
                       .clamp(-1.0, 1.0)
                       .add(1.0)
                       .mul(127.5)
                       .round()
                       .to(torch::kUInt8)
                       .permute({1, 2, 0})
                       .contiguous();
  Image out(static_cast<int>(chw.size(2)), static_cast<int>(chw.size(1)));
  std::memcpy(out.pixels.data(), hwc.data_ptr<uint8_t>(), out.pixels.size());
  return out;
}

std::vector<Image> tensor_to_images(const at::Tensor& bchw, int scale) {
  MD_CHECK(bchw.dim() == 4, "expected a batch of images (B, 3, H, W), got {}", c10::str(bchw.sizes()));
  MD_CHECK(scale >= 1, "image scale must be >= 1, got {}", scale);
  std::vector<Image> out;
  for (int64_t i = 0; i < bchw.size(0); ++i) {
    Image im = tensor_to_image(bchw[i]);
    out.push_back(scale > 1 ? resize(im, im.width * scale, im.height * scale) : std::move(im));
  }
  return out;
}

}  // namespace microdit
