// Precomputed training data: sharded safetensors files that the trainer streams, so training
// never touches pixels or text. Format "microdit-shards" version 1 (docs/data-format.md):
//
//   DIR/index.json                 {"format", "version", "splits": {name: {"shards": [...],
//                                   "count", "shard_counts": [...]}}, "image_shape": [C,H,W],
//                                   "caption_shape": [L,W], "value_range", "encoder"}
//   DIR/<split>-NNNNN.safetensors  images (N, C, H, W) float16, captions (N, L, W) float16;
//                                  __metadata__: format, version, count, texts (JSON list)
#pragma once
#include <ATen/core/Tensor.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace microdit {

using at::Tensor;

constexpr const char* kShardFormat = "microdit-shards";
constexpr int kShardVersion = 1;

struct ShardIndex {
  std::vector<int64_t> image_shape;    // C, H, W
  std::vector<int64_t> caption_shape;  // L, W
  std::string encoder, value_range;
  std::map<std::string, std::vector<std::string>> shards;  // split -> file names
  std::map<std::string, int64_t> counts;                   // split -> samples
  // split -> samples in each shard; empty for an index written before it was recorded
  std::map<std::string, std::vector<int64_t>> shard_counts;
};

// Writes shards of at most `per_shard` samples per split; finish() writes index.json.
// Every file is written atomically.
class ShardWriter {
 public:
  ShardWriter(std::string dir, std::vector<int64_t> image_shape, std::vector<int64_t> caption_shape,
              std::string encoder, std::string value_range, int64_t per_shard = 1024);
  // image (C, H, W), caption (L, W), any float dtype.
  void add(const std::string& split, const Tensor& image, const Tensor& caption,
           const std::string& text);
  ShardIndex finish();

 private:
  struct Pending {
    std::vector<Tensor> images, captions;
    std::vector<std::string> texts;
  };
  void flush(const std::string& split);
  std::string dir_;
  ShardIndex index_;
  int64_t per_shard_;
  std::map<std::string, Pending> pending_;
};

ShardIndex read_shard_index(const std::string& dir);

// One split held in memory (float16), as the emoji set and its embeddings are small.
struct ShardSet {
  Tensor images;    // (N, C, H, W) float16
  Tensor captions;  // (N, L, W) float16
  std::vector<std::string> texts;
  int64_t size() const { return images.defined() ? images.size(0) : 0; }
};
ShardSet load_split(const std::string& dir, const std::string& split);
// One shard file of `dir`, checked against the index's shapes.
ShardSet load_shard(const std::string& dir, const ShardIndex& index, const std::string& file);

// A split read from disk a window of shards at a time, for data larger than memory.
struct ShardStream {
  std::string dir;
  ShardIndex index;
  std::vector<std::string> files;  // the split's shards
  std::vector<int64_t> counts;     // samples per shard
  int window = 1;                  // shards in memory (and shuffled together) at a time
  int64_t size() const;
};
// Reads the index (shard sizes from it, or from each shard for an older index).
ShardStream open_stream(const std::string& dir, const std::string& split, int window);

// A training set read by sample index (the reference's latent MDS, src/data/latent_source.h).
// gather() may be called from the loader's thread; it returns float16 or float32 rows in the
// order of `ids`: images (n, C, H, W), captions (n, L, W).
struct SampleSource {
  virtual ~SampleSource() = default;
  virtual int64_t size() const = 0;
  virtual void gather(const std::vector<int64_t>& ids, Tensor& images, Tensor& captions) const = 0;
};

struct Batch {
  Tensor images, captions;  // float32 (B, C, H, W), (B, L, W)
  int64_t epoch = 0, position = 0;  // where the loader stands after this batch
};

// Shuffled batches prepared by a background thread a few batches ahead. In memory (ShardSet):
// a new permutation of the whole split each epoch. Streamed (ShardStream): each epoch shuffles
// the order of the shards, cuts it into windows of `window` shards, and shuffles the samples
// within each window; the thread reads a window's shards when the batches reach it, so disk
// reads overlap training. (epoch, position) is the data position to save in checkpoints; a
// loader started from a saved position yields exactly the batches that would have followed.
// An error in the thread (a corrupt shard) is rethrown by next().
// Data parallelism: with world > 1, batch_size is the global batch and each next() yields rank
// `rank`'s rows [rank * batch_size / world, +batch_size / world) of it; every rank walks the
// same epoch order, so the ranks' parts are disjoint and (epoch, position) are global.
class BatchLoader {
 public:
  BatchLoader(const ShardSet& data, int64_t batch_size, uint64_t seed, int64_t epoch = 0,
              int64_t position = 0, int prefetch = 4, int rank = 0, int world = 1);
  // By index: a new permutation of the whole source each epoch, as for a ShardSet.
  BatchLoader(const SampleSource& source, int64_t batch_size, uint64_t seed, int64_t epoch = 0,
              int64_t position = 0, int prefetch = 4, int rank = 0, int world = 1);
  BatchLoader(const ShardStream& stream, int64_t batch_size, uint64_t seed, int64_t epoch = 0,
              int64_t position = 0, int prefetch = 4, int rank = 0, int world = 1);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;
  Batch next();

 private:
  void start(int rank, int world);
  void run();
  Batch make(int64_t& epoch, int64_t& position);
  int64_t size() const;
  // Streamed: rows [begin, begin + n) of the epoch's order, loading windows as needed.
  void gather_stream(int64_t epoch, int64_t begin, int64_t n, std::vector<Tensor>& images,
                     std::vector<Tensor>& captions);
  const ShardSet* data_ = nullptr;
  const ShardStream* stream_ = nullptr;
  const SampleSource* source_ = nullptr;
  // streamed epoch plan: window w covers epoch rows [window_start_[w], window_start_[w + 1])
  int64_t plan_epoch_ = -1, loaded_window_ = -1;
  std::vector<std::vector<size_t>> window_files_;
  std::vector<int64_t> window_start_;
  ShardSet window_data_;
  std::exception_ptr error_;
  int64_t batch_, epoch_, position_;
  int64_t rows_ = 0, first_row_ = 0;  // this rank's part of each batch
  uint64_t seed_;
  int prefetch_;
  Tensor perm_;
  int64_t perm_epoch_ = -1;
  std::deque<Batch> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> stop_{false};
  std::thread worker_;
};

}  // namespace microdit
