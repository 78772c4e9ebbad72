#include "data/prepare_latents.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/progress.h"
#include "data/image.h"
#include "data/image_io.h"
#include "data/mds.h"
#include "data/webdataset.h"
#include "io/atomic_file.h"
#include "text/encoder.h"
#include "vae/autoencoder_kl.h"

namespace microdit {

using json = nlohmann::json;

namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + len > n || (len == 2 && c < 0xC2) || (len == 4 && c > 0xF4)) return false;
    for (int k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return false;
    i += len;
  }
  return true;
}

bool read_file(const std::string& path, std::string& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  out = ss.str();
  return !in.bad();
}

// Append-only JSON-lines logs of the resume state (finished shard entries, skipped items), so a
// long run does not rewrite a growing state file after every shard. The state file says how
// many lines count; lines after those (a kill between the append and the state) are dropped.
void append_json_lines(const std::string& path, const std::vector<json>& items) {
  if (items.empty()) return;
  std::string text;
  for (const auto& j : items) text += j.dump() + "\n";
  std::FILE* f = std::fopen(path.c_str(), "ab");
  MD_CHECK(f, "{}: cannot append", path);
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0 &&
                  ::fsync(::fileno(f)) == 0;
  std::fclose(f);
  MD_CHECK(ok, "{}: write failed (disk full?)", path);
}

// The first n lines of a log, rewritten to hold exactly those; Error when it has fewer.
std::vector<json> take_json_lines(const std::string& path, int64_t n) {
  std::vector<json> out;
  std::ifstream in(path);
  std::string line, text;
  while (static_cast<int64_t>(out.size()) < n && std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded()) break;
    out.push_back(std::move(j));
    text += line + "\n";
  }
  MD_CHECK(static_cast<int64_t>(out.size()) == n,
           "{}: holds {} complete lines, the resume state expects {}; delete the output folder and "
           "start again", path, out.size(), n);
  write_file_atomic(path, text);
  return out;
}

void write_json_atomic(const std::string& path, const json& j) {
  write_file_atomic(path, j.dump(2) + "\n");
}

// Caption checks shared by the sources: "" when fine, else the reason to skip.
std::string caption_problem(const std::string& caption, bool present) {
  if (!present) return "missing caption";
  if (caption.empty()) return "empty caption";
  if (!valid_utf8(caption)) return "caption is not valid UTF-8";
  return "";
}

bool is_image_ext(const std::string& ext) {
  return ext == "jpg" || ext == "jpeg" || ext == "png" || ext == "webp";
}

// A caption from a JSON value: a string, the first string of a list, or an object's
// `key` field (default: caption, then text, then prompt).
std::optional<std::string> caption_from_json(const json& j, const std::string& key) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_array() && !j.empty() && j[0].is_string()) return j[0].get<std::string>();
  if (j.is_object()) {
    const std::vector<std::string> keys =
        key.empty() ? std::vector<std::string>{"caption", "text", "prompt"} : std::vector{key};
    for (const auto& k : keys)
      if (j.contains(k)) return caption_from_json(j[k], "");
  }
  return std::nullopt;
}

// ---- sources -------------------------------------------------------------------------------

// A folder of images with same-name .txt captions (recursive, sorted by relative path), or a
// folder with captions.jsonl ({file, caption[, split]}; lines whose split is not "train" are
// left out, as `microdit dataset` makes a held-out split).
class FolderSource : public ImageCaptionSource {
 public:
  explicit FolderSource(std::string dir) : dir_(std::move(dir)) {
    if (is_regular_file(dir_ + "/captions.jsonl")) {
      jsonl_ = true;
      std::ifstream in(dir_ + "/captions.jsonl");
      std::string line;
      for (int n = 1; std::getline(in, line); ++n) {
        if (trim(line).empty()) continue;
        auto j = json::parse(line, nullptr, false);
        MD_CHECK(!j.is_discarded() && j.is_object() && j.contains("file") && j["file"].is_string(),
                 "{}/captions.jsonl:{}: expected a JSON object with file and caption", dir_, n);
        if (j.contains("split") && j["split"] != "train") continue;
        Entry e{j["file"].get<std::string>(), "", false};
        if (j.contains("caption") && j["caption"].is_string()) {
          e.caption = j["caption"].get<std::string>();
          e.has_caption = true;
        }
        entries_.push_back(std::move(e));
      }
    } else {
      walk("");
    }
    MD_CHECK(!entries_.empty(), "{}: no images (.jpg, .jpeg, .png, .webp) in the folder", dir_);
  }
  std::string describe() const override {
    return fmt::format("{} ({} images, captions from {})", dir_, entries_.size(),
                       jsonl_ ? "captions.jsonl" : "same-name .txt files");
  }
  int64_t total() const override { return static_cast<int64_t>(entries_.size()); }
  bool next(ImageCaptionItem& item) override {
    if (pos_ >= entries_.size()) return false;
    const Entry& e = entries_[pos_];
    item = {};
    item.index = static_cast<int64_t>(pos_++);
    item.name = dir_ + "/" + e.file;
    item.image_path = item.name;
    if (jsonl_) {
      item.caption = trim(e.caption);
      item.error = caption_problem(item.caption, e.has_caption);
    } else {
      const std::string cap = dir_ + "/" + e.file.substr(0, e.file.rfind('.')) + ".txt";
      std::string text;
      const bool present = is_regular_file(cap) && read_file(cap, text);
      item.caption = trim(text);
      item.error = caption_problem(item.caption, present);
      if (!present) item.error += " (no " + cap + ")";
    }
    return true;
  }
  void skip(int64_t n) override {
    pos_ = std::min(entries_.size(), pos_ + static_cast<size_t>(std::max<int64_t>(n, 0)));
  }

 private:
  struct Entry {
    std::string file, caption;
    bool has_caption;
  };
  void walk(const std::string& rel) {
    const std::string here = rel.empty() ? dir_ : dir_ + "/" + rel;
    for (const auto& n : list_dir(here)) {
      if (n.empty() || n[0] == '.') continue;
      const std::string r = rel.empty() ? n : rel + "/" + n;
      const std::string full = dir_ + "/" + r;
      if (is_directory(full)) {
        walk(r);
      } else {
        const size_t dot = n.rfind('.');
        if (dot != std::string::npos && is_image_ext(lower(n.substr(dot + 1))))
          entries_.push_back({r, "", false});
      }
    }
  }
  std::string dir_;
  bool jsonl_ = false;
  std::vector<Entry> entries_;
  size_t pos_ = 0;
};

class TarSource : public ImageCaptionSource {
 public:
  TarSource(const std::string& spec, std::string caption_key)
      : tars_(expand_tar_sources(spec)),
        reader_(tars_, {"jpg", "jpeg", "png", "webp", "txt", "json"}),
        caption_key_(std::move(caption_key)) {
    total_ = count_webdataset_samples(tars_);
  }
  std::string describe() const override {
    return fmt::format("{} webdataset tar file(s), {} samples", tars_.size(), total_);
  }
  int64_t total() const override { return total_; }
  bool next(ImageCaptionItem& item) override {
    WebDatasetSample s;
    if (!reader_.next(s)) return false;
    item = {};
    item.index = pos_++;
    item.name = s.name();
    if (!s.error.empty()) {
      item.error = s.error;
      return true;
    }
    for (const char* ext : {"jpg", "jpeg", "png", "webp"}) {
      auto it = s.files.find(ext);
      if (it != s.files.end()) {
        item.image_bytes = std::move(it->second);
        break;
      }
    }
    bool present = false;
    if (auto it = s.files.find("txt"); it != s.files.end()) {
      item.caption = trim(it->second);
      present = true;
    } else if (auto jt = s.files.find("json"); jt != s.files.end()) {
      auto j = json::parse(jt->second, nullptr, false);
      if (!j.is_discarded())
        if (auto c = caption_from_json(j, caption_key_)) {
          item.caption = trim(*c);
          present = true;
        }
    }
    if (s.files.count("jpg") + s.files.count("jpeg") + s.files.count("png") + s.files.count("webp") == 0)
      item.error = "no image member (.jpg, .jpeg, .png, .webp)";
    else
      item.error = caption_problem(item.caption, present);
    return true;
  }

 private:
  std::vector<std::string> tars_;
  WebDatasetReader reader_;
  std::string caption_key_;
  int64_t total_ = 0, pos_ = 0;
};

class MdsSource : public ImageCaptionSource {
 public:
  MdsSource(const std::string& dir, const std::string& caption_key) : dir_(dir), ds_({dir}) {
    std::vector<std::string> names;
    for (const auto& c : ds_.columns()) names.push_back(c.name + " (" + c.encoding + ")");
    for (const char* n : {"jpg", "jpeg", "png", "image"}) {
      const int i = ds_.column_index(n);
      if (i < 0) continue;
      const auto& enc = ds_.columns()[i].encoding;
      if (enc == "jpeg" || enc == "png" || enc == "pil" || enc == "bytes") {
        image_col_ = n;
        image_enc_ = enc;
        break;
      }
    }
    MD_CHECK(!image_col_.empty(),
             "{}: no image column (jpg, jpeg, png or image with encoding jpeg, png, pil or bytes) "
             "among {}", dir, fmt::join(names, ", "));
    caption_col_ = caption_key.empty() ? "caption" : caption_key;
    const int ci = ds_.column_index(caption_col_);
    MD_CHECK(ci >= 0, "{}: no caption column '{}' among {} (name it with --caption-key)", dir,
             caption_col_, fmt::join(names, ", "));
    caption_enc_ = ds_.columns()[ci].encoding;
    MD_CHECK(caption_enc_ == "str" || caption_enc_ == "json",
             "{}: caption column '{}' has encoding {}, expected str or json", dir, caption_col_,
             caption_enc_);
  }
  std::string describe() const override {
    return fmt::format("MDS {} ({} samples, image column {} ({}), caption column {} ({}))", dir_,
                       ds_.size(), image_col_, image_enc_, caption_col_, caption_enc_);
  }
  int64_t total() const override { return ds_.size(); }
  bool next(ImageCaptionItem& item) override {
    if (pos_ >= ds_.size()) return false;
    item = {};
    item.index = pos_;
    item.name = fmt::format("{}[{}]", dir_, pos_);
    const int64_t i = pos_++;
    try {
      item.image_bytes = ds_.get(i, image_col_);
      if (image_enc_ == "pil") item.image_encoding = "pil";
      std::string cap = ds_.get(i, caption_col_);
      bool present = true;
      if (caption_enc_ == "json") {
        auto j = json::parse(cap, nullptr, false);
        auto c = j.is_discarded() ? std::nullopt : caption_from_json(j, "");
        present = c.has_value();
        cap = c.value_or("");
      }
      item.caption = trim(cap);
      item.error = caption_problem(item.caption, present);
    } catch (const std::exception& e) {
      item.error = e.what();
    }
    return true;
  }
  void skip(int64_t n) override { pos_ = std::min(ds_.size(), pos_ + std::max<int64_t>(n, 0)); }

 private:
  std::string dir_;
  MDSDataset ds_;
  std::string image_col_, image_enc_, caption_col_, caption_enc_;
  int64_t pos_ = 0;
};

// ---- decoding on worker threads ------------------------------------------------------------

class ThreadPool {
 public:
  // nice > 0 lowers the workers' priority (Linux: per thread), so that on a busy CPU the
  // encoders' intra-op threads, which wait for each other, are not descheduled by decoding.
  ThreadPool(int n, int nice) {
    for (int i = 0; i < n; ++i)
      threads_.emplace_back([this, nice] {
        if (nice > 0) ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), nice);
        loop();
      });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      queue_.clear();  // work nobody will wait for
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  template <class F>
  auto submit(F f) -> std::future<decltype(f())> {
    auto task = std::make_shared<std::packaged_task<decltype(f())()>>(std::move(f));
    auto fut = task->get_future();
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.emplace_back([task] { (*task)(); });
    }
    cv_.notify_one();
    return fut;
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (stop_) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job();
    }
  }
  std::vector<std::thread> threads_;
  std::deque<std::function<void()>> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

struct Decoded {
  int64_t index = 0;
  std::string name, caption, error;
  std::vector<at::Tensor> pixels;  // per size (ascending): (3, S, S) float32 in [-1, 1]
};

std::string error_text(const std::exception& e) {
  std::string msg;
  if (const auto* ce = dynamic_cast<const c10::Error*>(&e))
    msg = ce->what_without_backtrace();
  else
    msg = e.what();
  return msg.substr(0, msg.find('\n'));
}

Decoded decode_item(ImageCaptionItem item, const std::vector<int>& sizes, int min_size) {
  Decoded d;
  d.index = item.index;
  d.name = std::move(item.name);
  d.caption = std::move(item.caption);
  if (!item.error.empty()) {
    d.error = std::move(item.error);
    return d;
  }
  try {
    if (!item.image_path.empty()) {
      MD_CHECK(read_file(item.image_path, item.image_bytes), "cannot read the file");
    }
    Image img = item.image_encoding == "pil" ? decode_pil_payload(item.image_bytes, d.name)
                                             : decode_image_bytes(item.image_bytes, d.name);
    if (min_size > 0 && std::min(img.width, img.height) < min_size) {
      d.error = fmt::format("image {}x{} is smaller than --min-size {}", img.width, img.height,
                            min_size);
      return d;
    }
    for (int s : sizes) d.pixels.push_back(reference_preprocess(img, s));
  } catch (const std::exception& e) {
    d.error = error_text(e);
    // Messages from the decoder start with the item's name; the report has it already.
    if (d.error.rfind(d.name + ": ", 0) == 0) d.error = d.error.substr(d.name.size() + 2);
    d.pixels.clear();
  }
  return d;
}

// The report's reason classes.
std::string skip_kind(const std::string& reason) {
  if (reason.find("caption") != std::string::npos) return "caption";
  if (reason.find("--min-size") != std::string::npos) return "too_small";
  if (reason.find("tar") != std::string::npos) return "source";
  return "image";
}

std::string round_trip_name(const std::string& kind) {
  if (kind == "caption") return "missing/empty caption";
  if (kind == "too_small") return "below --min-size";
  if (kind == "source") return "unreadable source entry";
  return "unreadable image";
}

// Bytes of a CPU tensor (made contiguous).
std::string tensor_bytes(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.nbytes());
}

}  // namespace

// ---- public helpers ----------------------------------------------------------------------------

void ImageCaptionSource::skip(int64_t n) {
  ImageCaptionItem item;
  for (int64_t i = 0; i < n && next(item); ++i) {
  }
}

std::unique_ptr<ImageCaptionSource> open_image_caption_source(const std::string& spec,
                                                 const ImageCaptionSourceOptions& options) {
  MD_CHECK(!spec.empty(), "--images: empty source");
  if (is_directory(spec)) {
    if (is_regular_file(spec + "/index.json")) {
      MD_CHECK(is_mds_dir(spec), "{}/index.json: not an MDS index (version 2, format mds)", spec);
      return std::make_unique<MdsSource>(spec, options.caption_key);
    }
    bool has_tar = false, has_image = false;
    for (const auto& n : list_dir(spec)) {
      if (is_tar_name(n)) has_tar = true;
      const size_t dot = n.rfind('.');
      if (dot != std::string::npos && is_image_ext(lower(n.substr(dot + 1)))) has_image = true;
    }
    if (has_tar && !has_image) return std::make_unique<TarSource>(spec, options.caption_key);
    return std::make_unique<FolderSource>(spec);
  }
  if (is_regular_file(spec)) {
    MD_CHECK(is_tar_name(spec), "{}: expected a folder, an MDS folder or webdataset .tar file(s)", spec);
    return std::make_unique<TarSource>(spec, options.caption_key);
  }
  // A glob of tar files (expand_tar_sources names the problem when nothing matches).
  return std::make_unique<TarSource>(spec, options.caption_key);
}

Image decode_pil_payload(const std::string& p, const std::string& name) {
  auto u32 = [&](size_t off) {
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) v |= static_cast<uint32_t>(static_cast<uint8_t>(p[off + k])) << (8 * k);
    return v;
  };
  MD_CHECK(p.size() >= 12, "{}: pil payload of {} bytes is too short", name, p.size());
  const uint32_t w = u32(0), h = u32(4), ml = u32(8);
  MD_CHECK(p.size() >= 12 + static_cast<size_t>(ml), "{}: truncated pil payload", name);
  const std::string mode = p.substr(12, ml);
  const int bpp = mode == "RGB" ? 3 : (mode == "RGBA" || mode == "RGBX") ? 4 : mode == "L" ? 1 : 0;
  MD_CHECK(bpp > 0, "{}: pil image mode '{}' is not supported (RGB, RGBA, RGBX, L)", name, mode);
  MD_CHECK(w > 0 && h > 0 && static_cast<int64_t>(w) * h <= kMaxImagePixels,
           "{}: pil image size {}x{} is out of range", name, w, h);
  const size_t off = 12 + ml, n = static_cast<size_t>(w) * h;
  MD_CHECK(p.size() - off == n * bpp, "{}: pil payload holds {} pixel bytes, expected {} for {}x{} {}",
           name, p.size() - off, n * bpp, w, h, mode);
  Image img(static_cast<int>(w), static_cast<int>(h));
  const auto* src = reinterpret_cast<const uint8_t*>(p.data() + off);
  for (size_t i = 0; i < n; ++i)
    for (int c = 0; c < 3; ++c) img.pixels[i * 3 + c] = src[i * bpp + (bpp == 1 ? 0 : c)];
  return img;
}

// ---- the prepare -------------------------------------------------------------------------------

PrepareLatentsResult prepare_latents(const PrepareLatentsOptions& o) {
  MD_CHECK(!o.out.empty(), "--out: empty path");
  MD_CHECK(!o.vae.empty(), "--vae: a VAE is needed (a diffusers folder or a .safetensors file)");
  MD_CHECK(o.batch >= 1, "--batch must be >= 1, got {}", o.batch);
  MD_CHECK(o.workers >= 0, "--workers must be >= 0, got {}", o.workers);
  MD_CHECK(o.caption_len >= 1, "--caption-len must be >= 1, got {}", o.caption_len);
  MD_CHECK(o.min_size >= 0, "--min-size must be >= 0, got {}", o.min_size);
  MD_CHECK(o.size_limit > 0 && o.size_limit < (int64_t{1} << 32),
           "--size-limit must be in 1..2^32-1 bytes, got {}", o.size_limit);
  MD_CHECK(!o.sizes.empty(), "--sizes: give at least one image size");
  std::vector<int> sizes = o.sizes;
  std::sort(sizes.begin(), sizes.end());
  MD_CHECK(std::adjacent_find(sizes.begin(), sizes.end()) == sizes.end(), "--sizes: {} repeats a size",
           fmt::join(o.sizes, ","));
  for (int s : sizes) MD_CHECK(s >= 8 && s % 8 == 0, "--sizes: {} is not a positive multiple of 8", s);
  std::optional<std::string> compression;
  if (!o.compression.empty() && o.compression != "none") compression = o.compression;

  // Everything that changes the bytes written (batch is recorded apart: see the header).
  const json fingerprint = {{"source", o.source},     {"vae", o.vae},
                            {"encoder", o.encoder},   {"sizes", sizes},
                            {"seed", o.seed},         {"min_size", o.min_size},
                            {"caption_len", o.caption_len}, {"size_limit", o.size_limit},
                            {"compression", compression.value_or("")}, {"caption_key", o.caption_key}};
  const std::string state_path = o.out + "/.prepare-state.json",
                    shards_log = o.out + "/.prepare-shards.jsonl",
                    skipped_log = o.out + "/.prepare-skipped.jsonl", meta_path = o.out + "/microdit.json",
                    index_path = o.out + "/index.json", report_path = o.out + "/prepare-report.json";

  auto read_json = [](const std::string& path) {
    std::string text;
    MD_CHECK(read_file(path, text), "{}: cannot read", path);
    auto j = json::parse(text, nullptr, false);
    MD_CHECK(!j.is_discarded() && j.is_object(), "{}: not a JSON object", path);
    return j;
  };
  auto differences = [&](const json& old) {
    std::vector<std::string> d;
    for (auto& [k, v] : fingerprint.items())
      if (!old.contains(k) || old[k] != v) d.push_back(fmt::format("{} {} -> {}", k, old.value(k, json()).dump(), v.dump()));
    return fmt::format("{}", fmt::join(d, ", "));
  };

  PrepareLatentsResult res;
  const bool has_state = is_regular_file(state_path);
  if (is_regular_file(index_path) && !has_state) {
    MD_CHECK(is_regular_file(meta_path),
             "{}: the folder already holds an MDS dataset not made by `microdit prepare --images`; "
             "choose another --out", o.out);
    const json meta = read_json(meta_path);
    MD_CHECK(meta.contains("prepare") && meta["prepare"] == fingerprint,
             "{}: the folder holds a prepare made with other settings ({}); choose another --out "
             "or delete it", o.out, meta.contains("prepare") ? differences(meta["prepare"]) : "unknown");
    res.already_done = true;
    res.written = meta.value("samples", int64_t{0});
    res.items = meta.value("items", int64_t{0});
    res.skipped = meta.value("skipped", int64_t{0});
    res.shards = meta.value("shards", int64_t{0});
    res.summary = fmt::format("{} already holds this prepare ({} samples in {} shard(s)): nothing to do",
                              o.out, res.written, res.shards);
    return res;
  }

  // Resume state.
  int batch = o.batch;
  int64_t consumed = 0;
  std::vector<json> finished;
  std::vector<json> skipped;  // {index, item, reason}, sorted by index
  if (has_state) {
    const json st = read_json(state_path);
    MD_CHECK(st.contains("prepare") && st["prepare"] == fingerprint,
             "{}: an unfinished prepare with other settings is there ({}); rerun it with its "
             "settings, or delete the folder", o.out,
             st.contains("prepare") ? differences(st["prepare"]) : "unknown");
    batch = st.at("batch").get<int>();
    consumed = st.at("consumed").get<int64_t>();
    finished = take_json_lines(shards_log, st.at("shards").get<int64_t>());
    skipped = take_json_lines(skipped_log, st.at("skipped").get<int64_t>());
    res.resumed = true;
    if (batch != o.batch)
      fmt::print("resuming with the interrupted run's --batch {} (same batches, same bytes)\n", batch);
  }

  // The source first (a wrong path fails fast), then the models, then the output folder.
  ImageCaptionSourceOptions so;
  so.caption_key = o.caption_key;
  auto source = open_image_caption_source(o.source, so);
  const auto device = resolve_device(o.device);
  const auto vae_dtype = device.is_cuda() ? at::kBFloat16 : at::kFloat;
  AutoencoderKL vae = load_vae(o.vae, device, vae_dtype);
  const VAEConfig& vcfg = vae->config();
  for (int s : sizes)
    MD_CHECK(s % vcfg.downsample_factor() == 0, "--sizes: {} is not a multiple of the VAE's factor {}",
             s, vcfg.downsample_factor());
  auto enc = text::make_text_encoder(o.encoder, {o.caption_len, device});
  const int64_t L = enc->length(), W = enc->width(), C = vcfg.latent_channels;

  MD_CHECK(make_dirs(o.out), "{}: cannot create the folder", o.out);

  std::vector<std::pair<std::string, std::string>> columns{{"caption", "str"},
                                                           {"caption_latents", "bytes"}};
  for (int s : sizes) columns.emplace_back(fmt::format("latents_{}", s), "bytes");
  MDSWriterOptions wo;
  wo.compression = compression;
  wo.size_limit = o.size_limit;
  MDSWriter writer(o.out, columns, wo, finished);
  const int cap_col = writer.column_index("caption"), emb_col = writer.column_index("caption_latents");
  std::vector<int> lat_col;
  for (int s : sizes) lat_col.push_back(writer.column_index(fmt::format("latents_{}", s)));

  fmt::print("source: {}\nvae: {} ({}, {} on {})\nencoder: {}\n", source->describe(), o.vae,
             vcfg.summary(), vae_dtype == at::kBFloat16 ? "bf16" : "fp32", device.str(), enc->describe());
  if (res.resumed)
    fmt::print("resuming: {} shard(s) kept, {} of {} input items done\n", finished.size(), consumed,
               source->total());

  int64_t written = writer.flushed_samples();
  const int64_t chunk_start = consumed - consumed % batch;
  source->skip(chunk_start);
  int abort_after = 0;
  if (const char* e = std::getenv("MICRODIT_PREPARE_ABORT_AFTER_SHARDS")) abort_after = std::atoi(e);
  int shards_this_run = 0;

  if (!has_state) {  // leftovers of a run killed before its first shard
    std::remove(shards_log.c_str());
    std::remove(skipped_log.c_str());
  }
  size_t logged_shards = finished.size(), logged_skipped = skipped.size();
  auto save_state = [&](int64_t consumed_now) {
    std::vector<json> new_shards(writer.shards().begin() + logged_shards, writer.shards().end());
    std::vector<json> new_skipped;
    while (logged_skipped < skipped.size() && skipped[logged_skipped]["index"].get<int64_t>() < consumed_now)
      new_skipped.push_back(skipped[logged_skipped++]);
    append_json_lines(shards_log, new_shards);
    append_json_lines(skipped_log, new_skipped);
    logged_shards = writer.shards().size();
    const json st = {{"prepare", fingerprint},
                     {"batch", batch},
                     {"consumed", consumed_now},
                     {"written", writer.flushed_samples()},
                     {"shards", logged_shards},
                     {"skipped", logged_skipped}};
    write_json_atomic(state_path, st);
  };

  // Decode threads: with CUDA the CPU only decodes (up to 8 threads); on the CPU the encoders
  // use the intra-op threads and decoding takes the cores left (at least one, at low priority).
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int workers = o.workers > 0       ? o.workers
                      : device.is_cuda() ? std::min(hw, 8)
                                         : std::clamp(hw - at::get_num_threads(), 1, 8);
  ThreadPool pool(workers, device.is_cuda() ? 0 : 10);
  std::deque<std::vector<std::future<Decoded>>> pending;
  bool source_done = false;
  int64_t next_index = chunk_start;
  auto fill = [&] {
    while (!source_done && pending.size() < 3) {
      std::vector<std::future<Decoded>> chunk;
      ImageCaptionItem item;
      while (static_cast<int>(chunk.size()) < batch) {
        if (!source->next(item)) {
          source_done = true;
          break;
        }
        MD_CHECK(item.index == next_index, "internal: source index {} != {}", item.index, next_index);
        ++next_index;
        chunk.push_back(pool.submit([it = std::move(item), &sizes, min = o.min_size]() mutable {
          return decode_item(std::move(it), sizes, min);
        }));
      }
      if (!chunk.empty()) pending.push_back(std::move(chunk));
    }
  };

  const int64_t total = source->total();
  ProgressBar bar("prepare", total >= 0 ? std::max<int64_t>(total - chunk_start, 0) : -1, "img");
  c10::InferenceMode guard;
  fill();
  while (!pending.empty()) {
    auto futures = std::move(pending.front());
    pending.pop_front();
    fill();  // keep the workers busy while this chunk is encoded
    std::vector<Decoded> valid;
    for (auto& f : futures) {
      Decoded d = f.get();
      if (!d.error.empty()) {
        if (d.index >= consumed) skipped.push_back({{"index", d.index}, {"item", d.name}, {"reason", d.error}});
      } else {
        valid.push_back(std::move(d));
      }
    }
    const int64_t n = static_cast<int64_t>(valid.size());
    if (n > 0) {
      std::vector<std::string> texts;
      for (const auto& d : valid) texts.push_back(d.caption);
      const at::Tensor emb = enc->encode(texts).to(at::kHalf).contiguous();  // (n, L, W)
      std::vector<at::Generator> gens;
      for (const auto& d : valid) gens.push_back(at::make_generator<at::CPUGeneratorImpl>(o.seed + d.index));
      std::vector<at::Tensor> lat;  // per size: (n, C, S/8, S/8) float16 CPU
      for (size_t k = 0; k < sizes.size(); ++k) {
        std::vector<at::Tensor> px, eps;
        const int64_t h = sizes[k] / vcfg.downsample_factor();
        for (int64_t i = 0; i < n; ++i) {
          px.push_back(valid[i].pixels[k]);
          eps.push_back(at::randn({C, h, h}, gens[i]));
        }
        const Posterior post = vae->encode(at::stack(px).to(device, vae_dtype));
        const at::Tensor z = post.sample_with_noise(at::stack(eps).to(post.mean.device(), post.mean.dtype()));
        lat.push_back(scale_latents(z.to(at::kFloat), vcfg).to(at::kCPU).to(at::kHalf).contiguous());
        for (auto& d : valid) d.pixels[k] = at::Tensor();
      }
      for (int64_t i = 0; i < n; ++i) {
        const Decoded& d = valid[i];
        if (d.index < consumed) continue;  // in a shard kept from the interrupted run
        std::vector<std::string> payloads(columns.size());
        payloads[cap_col] = d.caption;
        payloads[emb_col] = tensor_bytes(emb[i].unsqueeze(0));  // (1, L, W)
        for (size_t k = 0; k < sizes.size(); ++k) payloads[lat_col[k]] = tensor_bytes(lat[k][i]);
        const size_t before = writer.shards().size();
        writer.write(payloads);
        ++written;
        if (writer.shards().size() > before) {  // a shard was finished: everything before d is done
          save_state(d.index);
          if (abort_after > 0 && ++shards_this_run >= abort_after) {
            std::fflush(stdout);
            std::_Exit(75);
          }
        }
      }
    }
    bar.advance(static_cast<int64_t>(futures.size()),
                fmt::format("{} written, {} skipped", written, skipped.size()));
  }
  writer.flush();
  bar.finish(fmt::format("{} written, {} skipped", written, skipped.size()));

  const int64_t items = next_index;
  res.items = items;
  res.written = written;
  res.skipped = static_cast<int64_t>(skipped.size());
  res.shards = static_cast<int64_t>(writer.shards().size());
  std::map<std::string, int64_t> by_kind;
  for (auto& s : skipped) {
    s["kind"] = skip_kind(s["reason"].get<std::string>());
    ++by_kind[s["kind"].get<std::string>()];
  }
  const json report = {{"source", o.source},  {"items", items},
                       {"written", written},  {"skipped", res.skipped}, {"skipped_by_kind", by_kind},
                       {"skipped_items", skipped}};
  write_json_atomic(report_path, report);

  json latent_shapes = json::object();
  for (int s : sizes)
    latent_shapes[fmt::format("latents_{}", s)] = {C, s / vcfg.downsample_factor(), s / vcfg.downsample_factor()};
  const json meta = {
      {"format", "microdit-latents"},
      {"version", 1},
      {"encoder", o.encoder},
      {"encoder_describe", enc->describe()},
      {"caption_shape", {1, L, W}},
      {"caption_dtype", "float16"},
      {"latent_channels", C},
      {"scaling_factor", vcfg.scaling_factor},
      {"shift_factor", vcfg.shift_factor},
      {"sizes", sizes},
      {"latent_shapes", latent_shapes},
      {"latent_dtype", "float16"},
      {"latents", "posterior sample (mean + exp(logvar/2) * eps) times scaling_factor, after shift"},
      {"noise", fmt::format("eps for input item i: CPU generator (mt19937) seeded {} + i, randn of "
                            "(C, S/8, S/8) per size, sizes ascending", o.seed)},
      {"vae", o.vae},
      {"vae_dtype", vae_dtype == at::kBFloat16 ? "bfloat16" : "float32"},
      {"samples", written},
      {"items", items},
      {"skipped", res.skipped},
      {"shards", res.shards},
      {"prepare", fingerprint}};
  write_json_atomic(meta_path, meta);
  writer.write_index();
  std::remove(state_path.c_str());
  std::remove(shards_log.c_str());
  std::remove(skipped_log.c_str());

  std::vector<std::string> parts;
  for (const auto& [k, v] : by_kind) parts.push_back(fmt::format("{} {}", v, round_trip_name(k)));
  const double secs = bar.elapsed_seconds();
  res.summary = fmt::format(
      "prepared {} samples in {} shard(s) from {} items{}: {} skipped{}; report {}; {:.1f} s, {:.2f} img/s",
      written, res.shards, items, res.resumed ? " (resumed)" : "", res.skipped,
      parts.empty() ? "" : fmt::format(" ({})", fmt::join(parts, ", ")), report_path, secs,
      secs > 0 ? (items - chunk_start) / secs : 0.0);
  return res;
}

}  // namespace microdit
