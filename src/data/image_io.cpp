#include "data/image_io.h"

#include <png.h>
#include <torch/torch.h>
#include <turbojpeg.h>
#include <webp/decode.h>
#include <webp/demux.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstring>
#include <fstream>
#include <memory>

#include "core/error.h"
#include "core/fs.h"

namespace microdit {

namespace {

void check_dimensions(int64_t w, int64_t h, const std::string& name) {
  MD_CHECK(w > 0 && h > 0, "{}: image has no pixels ({}x{})", name, w, h);
  MD_CHECK(w * h <= kMaxImagePixels,
           "{}: image too large ({}x{} = {} pixels, the limit is {}, as Pillow's)", name, w, h,
           w * h, kMaxImagePixels);
}

// Pillow's MULDIV255: a * b / 255 rounded.
inline int muldiv255(int a, int b) {
  int tmp = a * b + 128;
  return ((tmp >> 8) + tmp) >> 8;
}

// ---- JPEG (TurboJPEG) ----------------------------------------------------------------

struct TjHandle {
  tjhandle h = tjInitDecompress();
  ~TjHandle() {
    if (h) tjDestroy(h);
  }
};

Image decode_jpeg(const std::string& bytes, const std::string& name) {
  TjHandle tj;
  MD_CHECK(tj.h, "{}: cannot initialise the JPEG decoder", name);
  auto* buf = reinterpret_cast<const unsigned char*>(bytes.data());
  int w = 0, h = 0, subsamp = 0, colorspace = 0;
  if (tjDecompressHeader3(tj.h, buf, bytes.size(), &w, &h, &subsamp, &colorspace) != 0)
    fail("{}: corrupt JPEG ({})", name, tjGetErrorStr2(tj.h));
  MD_CHECK(w > 0 && h > 0, "{}: corrupt JPEG (no frame header)", name);
  check_dimensions(w, h, name);
  const bool cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
  const int channels = cmyk ? 4 : 3;
  std::vector<uint8_t> raw(static_cast<size_t>(w) * h * channels);
  // Flags 0: accurate integer DCT and fancy upsampling, Pillow's (libjpeg's) defaults.
  if (tjDecompress2(tj.h, buf, bytes.size(), raw.data(), w, 0, h, cmyk ? TJPF_CMYK : TJPF_RGB,
                    0) != 0) {
    // A warning still yields an image; Pillow refuses truncated files, so do we.
    const std::string msg = tjGetErrorStr2(tj.h);
    if (tjGetErrorCode(tj.h) != TJERR_WARNING || msg.find("Premature end") != std::string::npos)
      fail("{}: corrupt JPEG ({})", name, msg);
  }
  Image img;
  img.width = w;
  img.height = h;
  if (!cmyk) {
    img.pixels = std::move(raw);
    return img;
  }
  // Pillow reads CMYK JPEGs with Adobe's inverted convention ("CMYK;I"), then converts to RGB
  // with cmyk2rgb: nk = 255 - k, channel = nk - nk * c / 255.
  img.pixels.resize(static_cast<size_t>(w) * h * 3);
  for (size_t i = 0, n = static_cast<size_t>(w) * h; i < n; ++i) {
    const uint8_t* p = &raw[i * 4];
    const int nk = p[3];  // 255 - (255 - stored k)
    for (int c = 0; c < 3; ++c) {
      const int v = nk - muldiv255(255 - p[c], nk);
      img.pixels[i * 3 + c] = static_cast<uint8_t>(std::clamp(v, 0, 255));
    }
  }
  return img;
}

// ---- PNG (libpng) --------------------------------------------------------------------

struct PngReadState {
  const std::string* bytes;
  size_t pos = 8;
  char message[256] = {0};
};

void png_read_from_string(png_structp png, png_bytep out, png_size_t n) {
  auto* st = static_cast<PngReadState*>(png_get_io_ptr(png));
  if (st->pos + n > st->bytes->size()) png_error(png, "file is truncated");
  std::memcpy(out, st->bytes->data() + st->pos, n);
  st->pos += n;
}

void png_on_error(png_structp png, png_const_charp msg) {
  auto* st = static_cast<PngReadState*>(png_get_error_ptr(png));
  std::snprintf(st->message, sizeof st->message, "%s", msg);
  png_longjmp(png, 1);
}
void png_on_warning(png_structp, png_const_charp) {}

// Decodes into `rows` (8-bit RGB, 8-bit RGBA for alpha images, 16-bit grey for `grey16`).
// Returns false with st.message set on a libpng error. Plain C data only past setjmp.
bool png_decode(PngReadState& st, std::vector<uint8_t>& out, int& w, int& h, int& channels,
                bool& grey16, const std::string& name) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &st, png_on_error, png_on_warning);
  if (!png) {
    std::snprintf(st.message, sizeof st.message, "out of memory");
    return false;
  }
  png_infop info = png_create_info_struct(png);
  std::vector<png_bytep> rows;
  if (!info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    if (!st.message[0]) std::snprintf(st.message, sizeof st.message, "decoding failed");
    return false;
  }
  png_set_read_fn(png, &st, png_read_from_string);
  png_set_sig_bytes(png, 8);
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
  png_set_chunk_malloc_max(png, 0);
  png_read_info(png, info);
  png_uint_32 pw = 0, ph = 0;
  int depth = 0, color = 0, interlace = 0;
  png_get_IHDR(png, info, &pw, &ph, &depth, &color, &interlace, nullptr, nullptr);
  if (pw == 0 || ph == 0 || static_cast<int64_t>(pw) * ph > kMaxImagePixels) {
    std::snprintf(st.message, sizeof st.message, "image too large or empty (%ux%u, the limit is %lld pixels)",
                  pw, ph, static_cast<long long>(kMaxImagePixels));
    png_destroy_read_struct(&png, &info, nullptr);
    return false;
  }
  (void)name;
  w = static_cast<int>(pw);
  h = static_cast<int>(ph);
  grey16 = color == PNG_COLOR_TYPE_GRAY && depth == 16;
  // Pillow ignores tRNS for grey/RGB/palette when converting to RGB: no tRNS expansion.
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if ((color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) && depth < 8)
    png_set_expand_gray_1_2_4_to_8(png);
  if (grey16) {
    png_set_swap(png);  // native little-endian uint16
  } else {
    if (depth == 16) png_set_strip_16(png);  // the high byte, as Pillow's ";16B" raw modes
    if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  }
  const int passes = png_set_interlace_handling(png);
  (void)passes;
  png_read_update_info(png, info);
  channels = png_get_channels(png, info);
  const size_t rowbytes = png_get_rowbytes(png, info);
  out.resize(rowbytes * ph);
  rows.resize(ph);
  for (png_uint_32 y = 0; y < ph; ++y) rows[y] = out.data() + y * rowbytes;
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

Image decode_png(const std::string& bytes, const std::string& name) {
  PngReadState st;
  st.bytes = &bytes;
  std::vector<uint8_t> out;
  int w = 0, h = 0, channels = 0;
  bool grey16 = false;
  if (!png_decode(st, out, w, h, channels, grey16, name))
    fail("{}: corrupt PNG ({})", name, st.message);
  Image img;
  img.width = w;
  img.height = h;
  const size_t n = static_cast<size_t>(w) * h;
  img.pixels.resize(n * 3);
  if (grey16) {
    // Pillow: "I;16" -> "RGB" clips to 255 rather than scaling.
    MD_CHECK(channels == 1 && out.size() == n * 2, "{}: unexpected PNG layout", name);
    for (size_t i = 0; i < n; ++i) {
      uint16_t v;
      std::memcpy(&v, &out[i * 2], 2);
      const uint8_t g = v > 255 ? 255 : static_cast<uint8_t>(v);
      img.pixels[i * 3] = img.pixels[i * 3 + 1] = img.pixels[i * 3 + 2] = g;
    }
    return img;
  }
  MD_CHECK((channels == 3 || channels == 4) && out.size() == n * channels,
           "{}: unexpected PNG layout ({} channels)", name, channels);
  if (channels == 3) {
    img.pixels = std::move(out);
  } else {
    for (size_t i = 0; i < n; ++i) std::memcpy(&img.pixels[i * 3], &out[i * 4], 3);  // alpha dropped
  }
  return img;
}

// ---- WebP (libwebp's animation decoder, as Pillow uses for every WebP) -----------------

Image decode_webp(const std::string& bytes, const std::string& name) {
  WebPBitstreamFeatures features;
  if (WebPGetFeatures(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), &features) !=
      VP8_STATUS_OK)
    fail("{}: corrupt WebP (cannot read its header)", name);
  WebPData data{reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()};
  WebPAnimDecoderOptions options;
  MD_CHECK(WebPAnimDecoderOptionsInit(&options), "{}: libwebp version mismatch", name);
  options.color_mode = MODE_RGBA;
  options.use_threads = 0;
  std::unique_ptr<WebPAnimDecoder, void (*)(WebPAnimDecoder*)> dec(
      WebPAnimDecoderNew(&data, &options), WebPAnimDecoderDelete);
  MD_CHECK(dec, "{}: corrupt WebP (cannot parse its container)", name);
  WebPAnimInfo info;
  MD_CHECK(WebPAnimDecoderGetInfo(dec.get(), &info), "{}: corrupt WebP", name);
  check_dimensions(info.canvas_width, info.canvas_height, name);
  uint8_t* rgba = nullptr;
  int timestamp = 0;
  MD_CHECK(WebPAnimDecoderHasMoreFrames(dec.get()) && WebPAnimDecoderGetNext(dec.get(), &rgba, &timestamp),
           "{}: corrupt WebP (cannot decode its first frame)", name);
  Image img;
  img.width = static_cast<int>(info.canvas_width);
  img.height = static_cast<int>(info.canvas_height);
  const size_t n = static_cast<size_t>(img.width) * img.height;
  img.pixels.resize(n * 3);
  for (size_t i = 0; i < n; ++i) std::memcpy(&img.pixels[i * 3], &rgba[i * 4], 3);
  return img;
}

std::string describe_magic(const std::string& b) {
  auto starts = [&](const char* m) { return b.rfind(m, 0) == 0; };
  if (starts("GIF8")) return "GIF";
  if (starts("BM")) return "BMP";
  if (starts("II*") || starts("MM")) return "TIFF";
  if (b.size() >= 12 && b.compare(4, 4, "ftyp") == 0) return "HEIF/AVIF";
  return "unknown";
}

}  // namespace

Image decode_image_bytes(const std::string& bytes, const std::string& name) {
  MD_CHECK(!bytes.empty(), "{}: empty image file", name);
  const auto* u = reinterpret_cast<const unsigned char*>(bytes.data());
  if (bytes.size() >= 3 && u[0] == 0xFF && u[1] == 0xD8 && u[2] == 0xFF) return decode_jpeg(bytes, name);
  if (bytes.size() >= 8 && std::memcmp(u, "\x89PNG\r\n\x1a\n", 8) == 0) return decode_png(bytes, name);
  if (bytes.size() >= 12 && std::memcmp(u, "RIFF", 4) == 0 && std::memcmp(u + 8, "WEBP", 4) == 0)
    return decode_webp(bytes, name);
  fail("{}: unsupported image format ({}; JPEG, PNG and WebP are read)", name, describe_magic(bytes));
}

Image decode_image_file(const std::string& path) {
  MD_CHECK(is_regular_file(path), "{}: no such file", path);
  std::ifstream in(path, std::ios::binary);
  MD_CHECK(in.good(), "{}: cannot open ({})", path, std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MD_CHECK(!in.bad(), "{}: read failed", path);
  return decode_image_bytes(bytes, path);
}

// ---- Pillow's bicubic resampling (Resample.c, 8 bits per channel) ----------------------

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;   // per output: xmin, count
  std::vector<int32_t> k;    // per output: ksize fixed-point weights
};

// Coefficients of outputs first .. first + count - 1 of an in_size -> out_size axis (each
// output's taps depend on its index only, so a window gives the full resize's values).
Coeffs precompute_coeffs(int in_size, int out_size, int first, int count) {
  const double scale = static_cast<double>(static_cast<float>(in_size)) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(static_cast<size_t>(count) * 2);
  c.k.assign(static_cast<size_t>(count) * c.ksize, 0);
  std::vector<double> kk(c.ksize);
  for (int o = 0; o < count; ++o) {
    const int xx = first + o;
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double w = bicubic_filter((x + xmin - center + 0.5) * ss);
      kk[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) kk[x] /= ww;
      const double v = kk[x];
      c.k[static_cast<size_t>(o) * c.ksize + x] =
          v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[o * 2] = xmin;
    c.bounds[o * 2 + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  if (v >= (1 << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uint8_t>(v >> kPrecisionBits);
}

// The window [x0, x0 + w) x [y0, y0 + h) of Pillow's width x height bicubic resize of `image`,
// computing only what the window needs: Pillow's horizontal pass over the source rows the
// window's output rows read, then its vertical pass (each skipped when that axis keeps its size).
Image resize_window(const Image& image, int width, int height, int x0, int y0, int w, int h) {
  const bool need_h = width != image.width, need_v = height != image.height;
  Image tmp;
  const Image* src = &image;
  int row0 = y0;  // the source row of the window's first row when there is no vertical pass
  Coeffs cv;
  if (need_v) {
    cv = precompute_coeffs(image.height, height, y0, h);
    row0 = cv.bounds[0];
    for (int i = 0; i < h; ++i) row0 = std::min(row0, cv.bounds[i * 2]);
  }
  int rows = h;
  if (need_v) {
    int last = 0;
    for (int i = 0; i < h; ++i) last = std::max(last, cv.bounds[i * 2] + cv.bounds[i * 2 + 1]);
    rows = last - row0;
    for (int i = 0; i < h; ++i) cv.bounds[i * 2] -= row0;
  }
  // Horizontal pass (or a plain copy of the window's columns) into rows x w.
  tmp.width = w;
  tmp.height = rows;
  tmp.pixels.resize(static_cast<size_t>(w) * rows * 3);
  if (need_h) {
    const Coeffs ch = precompute_coeffs(image.width, width, x0, w);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t yy = r0; yy < r1; ++yy) {
        const uint8_t* row = image.at(0, static_cast<int>(yy) + row0);
        uint8_t* out = tmp.at(0, static_cast<int>(yy));
        for (int xx = 0; xx < w; ++xx) {
          const int xmin = ch.bounds[xx * 2], xn = ch.bounds[xx * 2 + 1];
          const int32_t* k = &ch.k[static_cast<size_t>(xx) * ch.ksize];
          int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
          for (int x = 0; x < xn; ++x) {
            const uint8_t* p = row + (x + xmin) * 3;
            s0 += p[0] * k[x];
            s1 += p[1] * k[x];
            s2 += p[2] * k[x];
          }
          out[xx * 3] = clip8(s0);
          out[xx * 3 + 1] = clip8(s1);
          out[xx * 3 + 2] = clip8(s2);
        }
      }
    });
  } else {
    for (int yy = 0; yy < rows; ++yy)
      std::memcpy(tmp.at(0, yy), image.at(x0, yy + row0), static_cast<size_t>(w) * 3);
  }
  src = &tmp;
  if (!need_v) return tmp;
  Image out;
  out.width = w;
  out.height = h;
  out.pixels.resize(static_cast<size_t>(w) * h * 3);
  const int row_len = w * 3;
  at::parallel_for(0, h, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> acc(row_len);
    for (int64_t yy = r0; yy < r1; ++yy) {
      const int ymin = cv.bounds[yy * 2], yn = cv.bounds[yy * 2 + 1];
      const int32_t* k = &cv.k[static_cast<size_t>(yy) * cv.ksize];
      std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
      for (int y = 0; y < yn; ++y) {
        const uint8_t* row = src->at(0, y + ymin);
        const int32_t wgt = k[y];
        for (int i = 0; i < row_len; ++i) acc[i] += row[i] * wgt;
      }
      uint8_t* o = out.at(0, static_cast<int>(yy));
      for (int i = 0; i < row_len; ++i) o[i] = clip8(acc[i]);
    }
  });
  return out;
}

}  // namespace

Image pil_resize_bicubic(const Image& image, int width, int height) {
  MD_CHECK(!image.empty(), "cannot resize an empty image");
  MD_CHECK(width > 0 && height > 0, "bad resize target {}x{}", width, height);
  if (width == image.width && height == image.height) return image;
  return resize_window(image, width, height, 0, 0, width, height);
}

Image reference_resize_crop(const Image& image, int size) {
  MD_CHECK(size > 0, "bad image size {}", size);
  MD_CHECK(!image.empty(), "cannot preprocess an empty image");
  const int w = image.width, h = image.height;
  const int64_t shorter = std::min(w, h), longer = std::max(w, h);
  // torchvision: new_long = int(size * long / short), a float division then truncation.
  const double new_long_f = static_cast<double>(int64_t{size} * longer) / static_cast<double>(shorter);
  MD_CHECK(new_long_f < 2147483647.0, "image of {}x{} is too elongated to resize to {} px", w, h, size);
  const int new_long = static_cast<int>(new_long_f);
  const int nw = w <= h ? size : new_long, nh = w <= h ? new_long : size;
  // CenterCrop: offsets int(round((dim - size) / 2.0)), Python's round half to even.
  auto offset = [](int diff) {
    const int half = diff / 2;
    if (diff % 2 == 0) return half;
    return half % 2 == 0 ? half : half + 1;
  };
  const int left = offset(nw - size), top = offset(nh - size);
  if (nw == w && nh == h) {  // torchvision skips the resize
    if (w == size && h == size) return image;
    Image out;
    out.width = out.height = size;
    out.pixels.resize(static_cast<size_t>(size) * size * 3);
    for (int y = 0; y < size; ++y)
      std::memcpy(out.at(0, y), image.at(left, top + y), static_cast<size_t>(size) * 3);
    return out;
  }
  // Only the crop window of the resized image is computed: the same pixels, less work.
  return resize_window(image, nw, nh, left, top, size, size);
}

at::Tensor reference_to_tensor(const Image& image) {
  float lut[256];
  for (int v = 0; v < 256; ++v) {
    const float x = static_cast<float>(v) / 255.0f;  // ToTensor
    lut[v] = (x - 0.5f) / 0.5f;                      // Normalize(0.5, 0.5)
  }
  auto t = torch::empty({3, image.height, image.width}, torch::kFloat32);
  float* d = t.data_ptr<float>();
  const size_t plane = static_cast<size_t>(image.height) * image.width;
  for (size_t i = 0; i < plane; ++i)
    for (int c = 0; c < 3; ++c) d[c * plane + i] = lut[image.pixels[i * 3 + c]];
  return t;
}

at::Tensor reference_preprocess(const Image& image, int size) {
  return reference_to_tensor(reference_resize_crop(image, size));
}

}  // namespace microdit
