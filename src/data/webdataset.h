// WebDataset .tar shards (what img2dataset writes): members grouped into samples by key, read
// sequentially with libarchive (plain tar, also .tar.gz/.tar.zst through libarchive's filters).
//
// Key rules (as the webdataset package): a member "dir/000123.seg.png" has key "dir/000123"
// (the path up to the first dot of the basename) and extension "seg.png" (the rest, compared
// lowercased). Consecutive members with the same key form one sample; members whose basename
// starts with a dot or has no dot, and non-regular entries, are ignored.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace microdit {

// {key, lowercased extension}; {"", ""} when the member belongs to no sample.
std::pair<std::string, std::string> webdataset_split_name(const std::string& member_path);

// The tar files a source names: one .tar file, a folder (its *.tar/*.tar.gz/*.tgz/*.tar.zst
// files, sorted), or a glob pattern ("shards/cc12m-train-*.tar"), sorted. Throws Error when
// nothing matches.
std::vector<std::string> expand_tar_sources(const std::string& spec);
bool is_tar_name(const std::string& path);

struct WebDatasetSample {
  std::string tar, key;                      // where it came from, for messages
  std::map<std::string, std::string> files;  // extension -> member bytes (only `keep` ones)
  std::string error;                         // non-empty: the sample is unusable (e.g. truncated tar)
  std::string name() const { return tar + ":" + key; }
};

class WebDatasetReader {
 public:
  // `keep`: extensions whose bytes are read (others are skipped without reading); empty: all.
  explicit WebDatasetReader(std::vector<std::string> tars, std::vector<std::string> keep = {});
  ~WebDatasetReader();
  WebDatasetReader(const WebDatasetReader&) = delete;
  WebDatasetReader& operator=(const WebDatasetReader&) = delete;

  // The next sample in tar order; false at the end. A tar that cannot be opened or is corrupt
  // ends that tar with one sample carrying `error` (reading goes on with the next tar), so a
  // bad shard never stops a long run. The same input always gives the same sequence.
  bool next(WebDatasetSample& out);

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// Samples in the tars, counting headers only (fast for plain tar: data is seeked over).
int64_t count_webdataset_samples(const std::vector<std::string>& tars);

// Writes a plain (ustar/pax) tar of {member path, bytes}, in order, atomically. For tests and tools.
void write_tar(const std::string& path, const std::vector<std::pair<std::string, std::string>>& members);

}  // namespace microdit
