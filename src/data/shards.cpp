#include "data/shards.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>

#include "core/error.h"
#include "core/fs.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"

namespace microdit {

ShardWriter::ShardWriter(std::string dir, std::vector<int64_t> image_shape,
                         std::vector<int64_t> caption_shape, std::string encoder,
                         std::string value_range, int64_t per_shard)
    : dir_(std::move(dir)), per_shard_(per_shard) {
  MD_CHECK(per_shard_ >= 1, "shard size must be >= 1");
  MD_CHECK(make_dirs(dir_), "{}: cannot create folder", dir_);
  index_.image_shape = std::move(image_shape);
  index_.caption_shape = std::move(caption_shape);
  index_.encoder = std::move(encoder);
  index_.value_range = std::move(value_range);
}

void ShardWriter::add(const std::string& split, const Tensor& image, const Tensor& caption,
                      const std::string& text) {
  MD_CHECK(image.sizes().vec() == index_.image_shape, "shard writer: image shape mismatch");
  MD_CHECK(caption.sizes().vec() == index_.caption_shape, "shard writer: caption shape mismatch");
  auto& p = pending_[split];
  p.images.push_back(image.to(at::kCPU, at::kHalf));
  p.captions.push_back(caption.to(at::kCPU, at::kHalf));
  p.texts.push_back(text);
  if (static_cast<int64_t>(p.images.size()) >= per_shard_) flush(split);
}

void ShardWriter::flush(const std::string& split) {
  auto& p = pending_[split];
  if (p.images.empty()) return;
  auto& list = index_.shards[split];
  const std::string name = fmt::format("{}-{:05d}.safetensors", split, list.size());
  const int64_t n = static_cast<int64_t>(p.images.size());
  write_safetensors(dir_ + "/" + name,
                    {{"images", at::stack(p.images)}, {"captions", at::stack(p.captions)}},
                    {{"format", kShardFormat},
                     {"version", std::to_string(kShardVersion)},
                     {"count", std::to_string(n)},
                     {"texts", nlohmann::json(p.texts).dump()}});
  list.push_back(name);
  index_.counts[split] += n;
  index_.shard_counts[split].push_back(n);
  p = Pending{};
}

ShardIndex ShardWriter::finish() {
  for (auto& [split, p] : pending_) flush(split);
  nlohmann::json j;
  j["format"] = kShardFormat;
  j["version"] = kShardVersion;
  j["image_shape"] = index_.image_shape;
  j["caption_shape"] = index_.caption_shape;
  j["encoder"] = index_.encoder;
  j["value_range"] = index_.value_range;
  for (const auto& [split, files] : index_.shards)
    j["splits"][split] = {
        {"shards", files}, {"count", index_.counts[split]}, {"shard_counts", index_.shard_counts[split]}};
  write_file_atomic(dir_ + "/index.json", j.dump(2) + "\n");
  return index_;
}

ShardIndex read_shard_index(const std::string& dir) {
  const std::string path = dir + "/index.json";
  MD_CHECK(is_regular_file(path), "{}: no such file (run `microdit prepare` first)", path);
  std::ifstream f(path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception&) {
    fail("{}: corrupt index (not valid JSON)", path);
  }
  ShardIndex idx;
  try {
    MD_CHECK(j.at("format") == kShardFormat, "{}: not a {} index", path, kShardFormat);
    const int version = j.at("version").get<int>();
    MD_CHECK(version == kShardVersion, "{}: shard format version {} (this build reads {})", path,
             version, kShardVersion);
    idx.image_shape = j.at("image_shape").get<std::vector<int64_t>>();
    idx.caption_shape = j.at("caption_shape").get<std::vector<int64_t>>();
    idx.encoder = j.value("encoder", "");
    idx.value_range = j.value("value_range", "");
    for (auto& [split, v] : j.at("splits").items()) {
      idx.shards[split] = v.at("shards").get<std::vector<std::string>>();
      idx.counts[split] = v.at("count").get<int64_t>();
      if (v.contains("shard_counts")) {
        idx.shard_counts[split] = v.at("shard_counts").get<std::vector<int64_t>>();
        MD_CHECK(idx.shard_counts[split].size() == idx.shards[split].size(),
                 "{}: split '{}' lists {} shards but {} shard counts", path, split,
                 idx.shards[split].size(), idx.shard_counts[split].size());
      }
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: corrupt index ({})", path, e.what());
  }
  return idx;
}

ShardSet load_shard(const std::string& dir, const ShardIndex& idx, const std::string& name) {
  const std::string path = dir + "/" + name;
  auto f = read_safetensors(path);
  const Tensor* im = f.find("images");
  const Tensor* cap = f.find("captions");
  MD_CHECK(im && cap, "{}: shard lacks 'images' or 'captions'", path);
  MD_CHECK(im->dim() == 4 && im->sizes().slice(1).vec() == idx.image_shape,
           "{}: images have shape [{}], the index says [N, {}]", path,
           fmt::join(im->sizes(), ", "), fmt::join(idx.image_shape, ", "));
  MD_CHECK(cap->dim() == 3 && cap->sizes().slice(1).vec() == idx.caption_shape &&
               cap->size(0) == im->size(0),
           "{}: captions have shape [{}], expected [{}, {}]", path,
           fmt::join(cap->sizes(), ", "), im->size(0), fmt::join(idx.caption_shape, ", "));
  MD_CHECK(im->size(0) > 0, "{}: empty shard", path);
  ShardSet set;
  set.images = *im;
  set.captions = *cap;
  auto texts = f.metadata.count("texts") ? nlohmann::json::parse(f.metadata.at("texts"), nullptr, false)
                                         : nlohmann::json();
  MD_CHECK(texts.is_array() && static_cast<int64_t>(texts.size()) == im->size(0),
           "{}: caption texts missing or wrong count", path);
  for (const auto& t : texts) set.texts.push_back(t.get<std::string>());
  return set;
}

namespace {
const std::vector<std::string>& split_files(const ShardIndex& idx, const std::string& dir,
                                            const std::string& split) {
  auto it = idx.shards.find(split);
  MD_CHECK(it != idx.shards.end() && !it->second.empty(), "{}: no '{}' split in the shards", dir,
           split);
  return it->second;
}
}  // namespace

ShardSet load_split(const std::string& dir, const std::string& split) {
  const auto idx = read_shard_index(dir);
  std::vector<Tensor> images, captions;
  ShardSet set;
  for (const auto& name : split_files(idx, dir, split)) {
    ShardSet one = load_shard(dir, idx, name);
    images.push_back(one.images);
    captions.push_back(one.captions);
    set.texts.insert(set.texts.end(), one.texts.begin(), one.texts.end());
  }
  set.images = at::cat(images);
  set.captions = at::cat(captions);
  return set;
}

int64_t ShardStream::size() const {
  int64_t n = 0;
  for (int64_t c : counts) n += c;
  return n;
}

ShardStream open_stream(const std::string& dir, const std::string& split, int window) {
  MD_CHECK(window >= 1, "stream window must be >= 1 shard, got {}", window);
  ShardStream s;
  s.dir = dir;
  s.index = read_shard_index(dir);
  s.files = split_files(s.index, dir, split);
  s.window = window;
  auto it = s.index.shard_counts.find(split);
  if (it != s.index.shard_counts.end()) {
    s.counts = it->second;
  } else {  // an index from before shard_counts: read each shard once
    for (const auto& f : s.files) s.counts.push_back(load_shard(dir, s.index, f).size());
  }
  for (size_t i = 0; i < s.files.size(); ++i)
    MD_CHECK(s.counts[i] > 0, "{}/{}: empty shard", dir, s.files[i]);
  return s;
}

// ---- batches ---------------------------------------------------------------------------

BatchLoader::BatchLoader(const ShardSet& data, int64_t batch_size, uint64_t seed, int64_t epoch,
                         int64_t position, int prefetch, int rank, int world)
    : data_(&data), batch_(batch_size), epoch_(epoch), position_(position), seed_(seed),
      prefetch_(prefetch) {
  start(rank, world);
}

BatchLoader::BatchLoader(const SampleSource& source, int64_t batch_size, uint64_t seed,
                         int64_t epoch, int64_t position, int prefetch, int rank, int world)
    : source_(&source), batch_(batch_size), epoch_(epoch), position_(position), seed_(seed),
      prefetch_(prefetch) {
  start(rank, world);
}

BatchLoader::BatchLoader(const ShardStream& stream, int64_t batch_size, uint64_t seed,
                         int64_t epoch, int64_t position, int prefetch, int rank, int world)
    : stream_(&stream), batch_(batch_size), epoch_(epoch), position_(position), seed_(seed),
      prefetch_(prefetch) {
  start(rank, world);
}

// Checks the batch against the data and the ranks, then starts the prefetching thread.
void BatchLoader::start(int rank, int world) {
  MD_CHECK(batch_ >= 1 && batch_ <= size(), "batch size {} for a dataset of {} samples", batch_, size());
  MD_CHECK(world >= 1 && rank >= 0 && rank < world && batch_ % world == 0,
           "batch size {} cannot be split across {} ranks", batch_, world);
  rows_ = batch_ / world;
  first_row_ = rank * rows_;
  worker_ = std::thread([this] { run(); });
}

BatchLoader::~BatchLoader() {
  stop_ = true;
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

int64_t BatchLoader::size() const {
  return data_ ? data_->size() : source_ ? source_->size() : stream_->size();
}

void BatchLoader::gather_stream(int64_t epoch, int64_t begin, int64_t n, std::vector<Tensor>& images,
                                std::vector<Tensor>& captions) {
  const ShardStream& s = *stream_;
  if (plan_epoch_ != epoch) {  // shard order of this epoch, cut into windows
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed_ * 1000003ULL + epoch);
    auto order = at::randperm(static_cast<int64_t>(s.files.size()), gen, at::TensorOptions().dtype(at::kLong));
    window_files_.clear();
    window_start_ = {0};
    for (int64_t i = 0; i < order.size(0); ++i) {
      const auto f = static_cast<size_t>(order[i].item<int64_t>());
      if (i % s.window == 0) {
        window_files_.emplace_back();
        window_start_.push_back(window_start_.back());
      }
      window_files_.back().push_back(f);
      window_start_.back() += s.counts[f];
    }
    plan_epoch_ = epoch;
    loaded_window_ = -1;
  }
  for (int64_t row = begin; row < begin + n;) {
    const auto w = static_cast<int64_t>(
        std::upper_bound(window_start_.begin(), window_start_.end(), row) - window_start_.begin() - 1);
    if (loaded_window_ != w) {  // read the window's shards, shuffle its samples
      std::vector<Tensor> im, cap;
      for (size_t f : window_files_[w]) {
        ShardSet one = load_shard(s.dir, s.index, s.files[f]);
        MD_CHECK(one.size() == s.counts[f], "{}/{}: {} samples, the index says {}", s.dir,
                 s.files[f], one.size(), s.counts[f]);
        im.push_back(one.images);
        cap.push_back(one.captions);
      }
      auto gen = at::make_generator<at::CPUGeneratorImpl>((seed_ * 1000003ULL + epoch) * 7919ULL + w + 1);
      auto perm = at::randperm(window_start_[w + 1] - window_start_[w], gen, at::TensorOptions().dtype(at::kLong));
      window_data_.images = at::cat(im).index_select(0, perm);
      window_data_.captions = at::cat(cap).index_select(0, perm);
      loaded_window_ = w;
    }
    const int64_t take = std::min(begin + n, window_start_[w + 1]) - row;
    images.push_back(window_data_.images.narrow(0, row - window_start_[w], take));
    captions.push_back(window_data_.captions.narrow(0, row - window_start_[w], take));
    row += take;
  }
}

Batch BatchLoader::make(int64_t& epoch, int64_t& position) {
  if (position + batch_ > size()) {  // drop the last partial batch of an epoch
    ++epoch;
    position = 0;
  }
  Batch b;
  if (data_ || source_) {
    if (perm_epoch_ != epoch) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(seed_ * 1000003ULL + epoch);
      perm_ = at::randperm(size(), gen, at::TensorOptions().dtype(at::kLong));
      perm_epoch_ = epoch;
    }
  }
  if (source_) {
    auto ids = perm_.narrow(0, position + first_row_, rows_).contiguous();
    std::vector<int64_t> v(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    source_->gather(v, b.images, b.captions);
    b.images = b.images.to(at::kFloat);
    b.captions = b.captions.to(at::kFloat);
  } else if (data_) {
    auto ids = perm_.narrow(0, position + first_row_, rows_);
    b.images = data_->images.index_select(0, ids).to(at::kFloat);
    b.captions = data_->captions.index_select(0, ids).to(at::kFloat);
  } else {
    std::vector<Tensor> im, cap;
    gather_stream(epoch, position + first_row_, rows_, im, cap);
    b.images = at::cat(im).to(at::kFloat);
    b.captions = at::cat(cap).to(at::kFloat);
  }
  position += batch_;
  b.epoch = epoch;
  b.position = position;
  return b;
}

void BatchLoader::run() {
  int64_t epoch = epoch_, position = position_;
  while (!stop_) {
    Batch b;
    try {
      b = make(epoch, position);
    } catch (...) {  // handed to next(), which rethrows it on the training thread
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::current_exception();
      cv_.notify_all();
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return stop_ || static_cast<int>(queue_.size()) < prefetch_; });
    if (stop_) return;
    queue_.push_back(std::move(b));
    cv_.notify_all();
  }
}

Batch BatchLoader::next() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !queue_.empty() || error_; });
  if (queue_.empty()) std::rethrow_exception(error_);
  Batch b = std::move(queue_.front());
  queue_.pop_front();
  cv_.notify_all();
  return b;
}

}  // namespace microdit
