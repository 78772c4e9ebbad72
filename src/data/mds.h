// The MDS dataset format of mosaicml-streaming ("version 2", streaming 0.9-0.13; DATA_PATH.md
// section 3): a folder with index.json and shard files shard.NNNNN.mds[.zstd]. MDSWriter writes
// files byte-identical to streaming's MDSWriter; MDSDataset reads one or more such folders
// ("streams") by global sample index, as streaming's StreamingDataset numbers them.
#pragma once
#include <ATen/core/Tensor.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace microdit {

struct MDSColumn {
  std::string name, encoding;
  std::optional<int64_t> size;  // fixed payload size in bytes, nullopt when variable
};

namespace mds {

// The payload size an encoding fixes (int 8, float32 4, ndarray:float16:77,1024 157,696, ...),
// nullopt for variable-size ones. Unknown or malformed encodings are a microdit::Error.
std::optional<int64_t> encoded_size(const std::string& encoding);
bool is_encoding(const std::string& encoding);

// Python's json.dumps(value, sort_keys=True): ", " and ": " separators, non-ASCII escaped
// as \uXXXX (surrogate pairs above the BMP). Used for index.json, the shard config and the
// `json` encoding.
std::string python_json_dumps(const nlohmann::json& value);

// ---- encoders (payloads as streaming's mds_encode makes them) ----------------------------
std::string encode_str(const std::string& utf8);                  // str, also bytes/jpeg/png (raw)
std::string encode_int(int64_t v);                                // int: int64 little-endian
// A numeric scalar column: encoding one of int8..int64, uint8..uint64, float16/32/64 (the
// value converted as numpy's np.<dtype>(v) would), or str_int / str_float / str_decimal.
std::string encode_scalar(const std::string& encoding, double v);
std::string encode_scalar_int(const std::string& encoding, int64_t v);
std::string encode_json(const nlohmann::json& v);                 // json
// ndarray[:dtype[:d0,d1,...]] from a CPU tensor of a supported dtype (uint8, int8, int16,
// int32, int64, float16, float32, float64; uint16/32/64 need the matching torch dtype).
// Checks the encoding's dtype/shape when given; refuses empty and 0-d tensors as streaming.
std::string encode_ndarray(const std::string& encoding, const at::Tensor& t);

// ---- decoders ----------------------------------------------------------------------------
// ndarray payload -> CPU tensor of the stored dtype and shape (copy). `what` names the
// source in errors.
at::Tensor decode_ndarray(const std::string& encoding, const std::string& payload,
                          const std::string& what = "ndarray");
// Scalars, str_*, str, json -> a JSON value (int/float/string/parsed json).
nlohmann::json decode_value(const std::string& encoding, const std::string& payload,
                            const std::string& what = "value");

// Little-endian float16 bytes -> float16 tensor of `shape` (its numel must match the byte
// count exactly, else an Error naming `what`).
at::Tensor float16_tensor(const std::string& bytes, std::vector<int64_t> shape,
                          const std::string& what);

// ---- the reference's latent schema (DATA_PATH.md 2.3) ------------------------------------
// caption (str), caption_latents (bytes, float16 (1, 77, 1024)), latents_256 / latents_512
// (bytes, float16 (C, S/8, S/8), already x the VAE scaling factor), and with images jpg (jpeg).
std::vector<std::pair<std::string, std::string>> latent_schema(bool with_jpg = false);
// latents_<image_size> bytes -> float16 (C, image_size/8, image_size/8), C from the byte count.
at::Tensor latent_image_tensor(const std::string& bytes, int image_size, const std::string& what);
// caption_latents bytes -> float16 (1, L, width) with L from the byte count (77 for CLIP-H).
at::Tensor caption_latent_tensor(const std::string& bytes, int64_t width, const std::string& what);

// Hash algorithms the writer/reader can compute (hex digest of `data`): none are required;
// unsupported names are an Error. Currently: md5, sha1, sha224, sha256, sha384, sha512, xxh64.
bool is_supported_hash(const std::string& algo);
std::string hash_hex(const std::string& algo, const std::string& data);

}  // namespace mds

struct MDSWriterOptions {
  std::optional<std::string> compression;    // none, "zstd" or "zstd:L" (L = 1..22)
  std::vector<std::string> hashes;           // sorted algorithm names, see mds::is_supported_hash
  std::optional<int64_t> size_limit = 1 << 26;  // bytes (< 2^32); nullopt: one shard
};

// Writes `dir`/shard.NNNNN.mds[.zstd] and index.json exactly as streaming's MDSWriter
// (columns sorted by name, rollover before a sample that would pass size_limit - even into a
// 0-sample shard -, the config JSON in every shard). Each shard file is written atomically
// when it is flushed; index.json only by write_index()/finish().
//
// Resuming: pass the shard entries of a previous run (as in its index.json / shards()) as
// `finished_shards`; they must have this writer's config, and numbering continues after them.
// Samples written after the last flushed shard of the previous run are the caller's to redo.
class MDSWriter {
 public:
  // columns: (name, encoding) pairs in any order.
  MDSWriter(std::string dir, const std::vector<std::pair<std::string, std::string>>& columns,
            MDSWriterOptions options = {}, std::vector<nlohmann::json> finished_shards = {});
  ~MDSWriter();  // does NOT finish: unflushed samples are dropped (an interrupted run)
  MDSWriter(const MDSWriter&) = delete;
  MDSWriter& operator=(const MDSWriter&) = delete;

  // Sorted by name: the order write() takes payloads in.
  const std::vector<MDSColumn>& columns() const { return columns_; }
  int column_index(const std::string& name) const;  // -1 when absent

  // One sample: one encoded payload per column, in columns() order. Fixed-size columns must
  // have exactly their size. May flush the current shard first.
  void write(const std::vector<std::string>& payloads);

  // Shard entries (index.json objects) of every shard flushed so far, resumed ones included.
  const std::vector<nlohmann::json>& shards() const { return shards_; }
  int64_t flushed_samples() const;  // sum of shards()[i]["samples"]
  int64_t pending_samples() const { return static_cast<int64_t>(pending_.size()); }

  void flush();              // flushes the pending samples as a shard if there are any
  void write_index() const;  // index.json of shards() (atomic); pending samples not included
  void finish();             // flush() + write_index()
  const std::string& dir() const { return dir_; }
  // The config JSON embedded in every shard (also the shard entries' config keys).
  const std::string& config_json() const { return config_json_; }

 private:
  void flush_shard();
  std::string dir_;
  std::vector<MDSColumn> columns_;
  MDSWriterOptions options_;
  std::string config_json_;
  nlohmann::json config_;
  std::vector<nlohmann::json> shards_;
  std::vector<std::string> pending_;
  int64_t pending_size_ = 0;
};

// streaming's merge_index for local folders: `root`/index.json listing the shards of each
// `root`/<sub>/index.json in the order given, basenames prefixed "<sub>/".
void mds_merge_index(const std::string& root, const std::vector<std::string>& subdirs);

struct MDSReadOptions {
  // Where zstd/gz shards without their raw file are decompressed to (once, on first use;
  // reused when a file of the right size is already there). Empty: a private folder under
  // $TMPDIR (or /tmp) removed when the dataset is destroyed.
  std::string decompress_dir;
  int max_open_files = 256;  // shard files kept open (least recently used ones closed)
  bool verify_hashes = false;  // check raw_data hashes (supported algorithms) when a shard is opened
};

// One or more MDS folders read as one dataset: global index = folders in the order given,
// shards in index order, samples in shard order (0-sample shards contribute nothing). Every
// shard must be format "mds" version 2 with the same columns. Sample access is a pread of the
// offset pair then of the sample; safe to call from several threads at once.
class MDSDataset {
 public:
  explicit MDSDataset(std::vector<std::string> dirs, MDSReadOptions options = {});
  ~MDSDataset();
  MDSDataset(const MDSDataset&) = delete;
  MDSDataset& operator=(const MDSDataset&) = delete;

  int64_t size() const { return total_; }
  const std::vector<MDSColumn>& columns() const { return columns_; }
  int column_index(const std::string& name) const;  // -1 when absent
  const std::vector<std::string>& dirs() const { return dirs_; }
  int64_t stream_size(int stream) const;  // samples of dirs()[stream]
  int64_t stream_begin(int stream) const;  // global index of its first sample

  // All payloads of sample i (0 <= i < size()), in columns() order.
  std::vector<std::string> get_raw(int64_t i) const;
  // One column's payload / some columns' payloads (indices into columns(), in the order
  // asked): only their bytes are read (plus the sample's offsets and size header).
  std::string get(int64_t i, const std::string& column) const;
  std::vector<std::string> get_columns(int64_t i, const std::vector<int>& columns) const;

  struct Shard {
    std::string path;            // file read (raw, or the decompressed copy once made)
    std::string raw_path;        // the raw shard, when it exists on disk
    std::string zip_path;        // the compressed file, when raw_path is empty
    std::string compression;
    int64_t samples = 0, raw_bytes = 0, begin = 0;  // begin: global index of sample 0
    nlohmann::json entry;        // its index.json entry
  };
  const std::vector<Shard>& shards() const { return shards_; }

 private:
  struct Impl;
  std::vector<std::string> read(int64_t i, const std::vector<int>& wanted) const;  // empty: all
  std::vector<std::string> dirs_;
  std::vector<MDSColumn> columns_;
  std::vector<Shard> shards_;          // non-empty shards only, in global order
  std::vector<int64_t> stream_begin_;  // per stream, plus the total at the end
  int64_t total_ = 0;
  std::unique_ptr<Impl> impl_;
};

// True when `dir`/index.json is an MDS index (version 2, every shard format "mds").
bool is_mds_dir(const std::string& dir);

}  // namespace microdit
