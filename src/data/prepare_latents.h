// Images + captions -> the reference's latent MDS (DATA_PATH.md 2.3): columns `caption` (str),
// `caption_latents` (bytes: float16 C-order (1, L, W) text embedding, (1, 77, 1024) for CLIP-H)
// and `latents_<S>` per size S (bytes: float16 (C, S/8, S/8), a posterior SAMPLE times the VAE
// scaling factor). Streaming's MDSWriter layout, size_limit 256 MiB, no compression by default.
//
// Sources (open_image_caption_source): a folder of images with same-name .txt captions (or with a
// captions.jsonl of {file, caption}); webdataset .tar shards (a .tar, a folder of them, a glob);
// an MDS folder (index.json) with an image column and a caption column.
//
// Determinism: the item with global input index i (its position in the source, skipped items
// included) gets its posterior noise from a CPU generator seeded `seed + i`, one draw of
// (C, S/8, S/8) per size in ascending size order; batches are aligned on input indices
// (batch k = items [k*B, (k+1)*B)). So a resumed run writes the same bytes as an uninterrupted
// one on the same device, batch size and thread count.
//
// Resume: after each finished shard its index entry and the skipped items so far are appended
// to `out`/.prepare-shards.jsonl and .prepare-skipped.jsonl, then `out`/.prepare-state.json
// (atomic) records how many lines of each count and the input items consumed; a rerun
// continues from there.
// The end writes prepare-report.json, microdit.json, then index.json (atomic); a rerun of a
// finished prepare with the same settings does nothing.
#pragma once
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace microdit {

struct Image;

// One input item as read from a source (main thread); decoding happens on worker threads.
struct ImageCaptionItem {
  int64_t index = 0;          // global input index (0-based, in source order)
  std::string name;           // for messages and the report: a path, "tar:key" or "dir[i]"
  std::string caption;
  std::string image_path;     // read and decoded by the worker, or
  std::string image_bytes;    // already in memory (tar member, MDS payload)
  std::string image_encoding; // "" (sniffed from the bytes) or "pil" (MDS raw pixels)
  std::string error;          // non-empty: skip with this reason (e.g. "missing caption")
};

class ImageCaptionSource {
 public:
  virtual ~ImageCaptionSource() = default;
  virtual std::string describe() const = 0;
  virtual int64_t total() const = 0;  // items (an estimate for tars), -1 unknown
  // The next item; false at the end.
  virtual bool next(ImageCaptionItem& item) = 0;
  // Skips n items (as n calls of next, cheaper where possible).
  virtual void skip(int64_t n);
};

struct ImageCaptionSourceOptions {
  std::string caption_key;  // MDS / webdataset json: the caption field ("" = caption, text, prompt)
};

// Picks the kind from `spec` (see the top of this file); Error when it is none of them.
std::unique_ptr<ImageCaptionSource> open_image_caption_source(const std::string& spec,
                                                 const ImageCaptionSourceOptions& options = {});

// An MDS `pil` payload (u32 width, u32 height, u32 len(mode), mode, raw pixels) -> RGB as
// Pillow's convert("RGB") (modes RGB, RGBA/RGBX (alpha dropped), L).
Image decode_pil_payload(const std::string& payload, const std::string& name);

struct PrepareLatentsOptions {
  std::string source, vae, encoder = "minilm", out;
  std::vector<int> sizes{256, 512};
  int batch = 16;         // images per VAE / text-encoder batch
  int workers = 0;        // decode threads; 0: CUDA min(cores, 8), CPU the cores the encoders leave (>= 1)
  int min_size = 0;       // skip images whose shorter side is below this (0: keep all, as the reference)
  int caption_len = 77;   // text tokens (the reference: 77)
  uint64_t seed = 2024;   // posterior noise seed base (the reference seeds 2024 + process)
  int64_t size_limit = int64_t{1} << 28;  // 256 MiB, as the reference
  std::string compression;                // "" none (the reference), "zstd", "zstd:L"
  std::string caption_key;
  std::string device = "auto";
};

struct PrepareLatentsResult {
  bool already_done = false;  // a finished prepare with these settings was found
  bool resumed = false;
  int64_t items = 0, written = 0, skipped = 0, shards = 0;
  std::string summary;  // the one-line summary the CLI prints
};

// Runs (or resumes) the whole prepare. Bad settings / unreadable source -> microdit::Error;
// bad items are skipped and reported. Test hook: env MICRODIT_PREPARE_ABORT_AFTER_SHARDS=N
// ends the process (_Exit(75), like a kill) right after the N-th shard's state is saved.
PrepareLatentsResult prepare_latents(const PrepareLatentsOptions& options);

}  // namespace microdit
