// Image files as the reference's preprocessing sees them (docs: DATA_PATH.md 2.1): JPEG
// (libjpeg-turbo), PNG (libpng) and WebP (libwebp) decoded to 8-bit RGB the way Pillow's
// Image.open(...).convert("RGB") does, Pillow's integer bicubic resampling, and torchvision's
// Resize(S, BICUBIC) + CenterCrop(S) + ToTensor + Normalize(0.5, 0.5).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "data/image.h"

namespace microdit {

// Images larger than this many pixels are refused, as Pillow's DecompressionBombError
// (2 x Image.MAX_IMAGE_PIXELS) does, before any pixel memory is allocated.
inline constexpr int64_t kMaxImagePixels = 2 * 89478485;

// Decodes a JPEG, PNG or WebP file held in memory, the format told by its magic bytes.
// Like Pillow's convert("RGB"): grey is replicated, palettes are looked up, alpha (and PNG
// tRNS transparency) is dropped, not composited; CMYK/YCCK JPEGs use Pillow's CMYK -> RGB
// formula (Adobe-inverted data handled); 16-bit PNG channels keep their high byte, except
// 16-bit grey, which Pillow clips to 255 (mode "I;16" -> "RGB"). Animated WebP: first frame.
// Anything else (empty, truncated, unknown format, too large) is a one-line microdit::Error
// starting with `name_for_errors`.
Image decode_image_bytes(const std::string& bytes, const std::string& name_for_errors);
Image decode_image_file(const std::string& path);

// Pillow's Image.resize(size, Image.BICUBIC) on 8-bit RGB, bit-exact: separable, horizontal
// pass then vertical pass, 22-bit fixed-point weights (DATA_PATH.md 2.1.4). An axis whose
// size does not change is not resampled (as Pillow).
Image pil_resize_bicubic(const Image& image, int width, int height);

// torchvision Resize(size, BICUBIC) + CenterCrop(size) on a PIL image: the short side becomes
// `size`, the long side int(size * long / short) (truncated); no resize when the short side
// already is `size`; crop offsets rounded half to even. Returns a size x size image.
Image reference_resize_crop(const Image& image, int size);

// (3, size, size) float32 in [-1, 1]: reference_resize_crop, then ToTensor (v / 255 in
// float32) and Normalize(0.5, 0.5) ((x - 0.5) / 0.5 in float32), bit-identical to torchvision.
at::Tensor reference_preprocess(const Image& image, int size);
// The same normalisation without resizing: (3, H, W) float32.
at::Tensor reference_to_tensor(const Image& image);

}  // namespace microdit
