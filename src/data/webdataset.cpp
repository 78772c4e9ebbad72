#include "data/webdataset.h"

#include <archive.h>
#include <archive_entry.h>
#include <glob.h>

#include <algorithm>
#include <cstdio>
#include <optional>

#include "core/error.h"
#include "core/fs.h"

namespace microdit {

namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

struct Archive {
  archive* a = nullptr;
  explicit Archive(const std::string& path, std::string& error) {
    a = archive_read_new();
    archive_read_support_format_tar(a);
    archive_read_support_format_gnutar(a);
    archive_read_support_filter_all(a);
    if (archive_read_open_filename(a, path.c_str(), 1 << 16) != ARCHIVE_OK) {
      error = archive_error_string(a) ? archive_error_string(a) : "cannot open";
      close();
    }
  }
  ~Archive() { close(); }
  void close() {
    if (a) archive_read_free(a);
    a = nullptr;
  }
  std::string error_text() const {
    const char* e = a ? archive_error_string(a) : nullptr;
    return e ? e : "corrupt tar";
  }
};

// One member, read or skipped. Returns false (with `error`) on a read failure.
bool read_member(archive* a, int64_t size, bool keep, std::string& bytes, std::string& error) {
  bytes.clear();
  if (!keep) {
    if (archive_read_data_skip(a) != ARCHIVE_OK) {
      error = archive_error_string(a) ? archive_error_string(a) : "corrupt tar";
      return false;
    }
    return true;
  }
  if (size > 0) bytes.reserve(static_cast<size_t>(size));
  char buf[1 << 16];
  for (;;) {
    const la_ssize_t n = archive_read_data(a, buf, sizeof buf);
    if (n == 0) break;
    if (n < 0) {
      error = archive_error_string(a) ? archive_error_string(a) : "corrupt tar";
      return false;
    }
    bytes.append(buf, static_cast<size_t>(n));
  }
  if (size >= 0 && static_cast<int64_t>(bytes.size()) != size) {
    error = fmt::format("member is {} bytes, expected {} (truncated tar)", bytes.size(), size);
    return false;
  }
  return true;
}

}  // namespace

std::pair<std::string, std::string> webdataset_split_name(const std::string& path) {
  const size_t slash = path.rfind('/');
  const size_t base = slash == std::string::npos ? 0 : slash + 1;
  const size_t dot = path.find('.', base);
  if (dot == std::string::npos || dot == base || dot + 1 == path.size()) return {"", ""};
  return {path.substr(0, dot), lower(path.substr(dot + 1))};
}

bool is_tar_name(const std::string& path) {
  const std::string p = lower(path);
  return ends_with(p, ".tar") || ends_with(p, ".tar.gz") || ends_with(p, ".tgz") ||
         ends_with(p, ".tar.zst");
}

std::vector<std::string> expand_tar_sources(const std::string& spec) {
  std::vector<std::string> out;
  if (is_directory(spec)) {
    for (const auto& n : list_dir(spec))
      if (is_tar_name(n) && is_regular_file(spec + "/" + n)) out.push_back(spec + "/" + n);
    MD_CHECK(!out.empty(), "{}: no .tar files in the folder", spec);
    return out;
  }
  if (is_regular_file(spec)) return {spec};
  glob_t g{};
  const int rc = ::glob(spec.c_str(), GLOB_BRACE | GLOB_TILDE, nullptr, &g);
  if (rc == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i)
      if (is_regular_file(g.gl_pathv[i])) out.emplace_back(g.gl_pathv[i]);
  ::globfree(&g);
  MD_CHECK(!out.empty(), "{}: no such file, folder or matching .tar files", spec);
  std::sort(out.begin(), out.end());
  return out;
}

struct WebDatasetReader::State {
  std::vector<std::string> tars;
  std::vector<std::string> keep;
  size_t next_tar = 0;
  std::string tar;
  std::optional<Archive> archive;
  // A member read ahead that starts the next sample.
  bool has_pending = false;
  std::string pending_key, pending_ext, pending_bytes;
  std::string pending_error;  // a read failure in the member that starts the next sample

  bool kept(const std::string& ext) const {
    return keep.empty() || std::find(keep.begin(), keep.end(), ext) != keep.end();
  }
};

WebDatasetReader::WebDatasetReader(std::vector<std::string> tars, std::vector<std::string> keep)
    : s_(std::make_unique<State>()) {
  s_->tars = std::move(tars);
  for (auto& k : keep) s_->keep.push_back(lower(k));
}

WebDatasetReader::~WebDatasetReader() = default;

bool WebDatasetReader::next(WebDatasetSample& out) {
  State& s = *s_;
  if (!s.pending_error.empty()) {
    out = {s.tar, s.pending_key, {}, std::move(s.pending_error)};
    s.pending_error.clear();
    s.archive.reset();
    return true;
  }
  for (;;) {
    if (!s.archive) {
      if (s.next_tar >= s.tars.size()) return false;
      s.tar = s.tars[s.next_tar++];
      std::string err;
      s.archive.emplace(s.tar, err);
      s.has_pending = false;
      if (!err.empty()) {
        s.archive.reset();
        out = {s.tar, "", {}, "cannot read tar: " + err};
        return true;
      }
    }
    out = {s.tar, "", {}, ""};
    bool started = false;
    if (s.has_pending) {
      out.key = s.pending_key;
      if (s.kept(s.pending_ext)) out.files[s.pending_ext] = std::move(s.pending_bytes);
      s.has_pending = false;
      started = true;
    }
    archive* a = s.archive->a;
    for (;;) {
      archive_entry* e = nullptr;
      const int r = archive_read_next_header(a, &e);
      if (r == ARCHIVE_EOF) {
        s.archive.reset();
        if (started) return true;
        break;  // next tar
      }
      if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
        out.error = "corrupt or truncated tar: " + s.archive->error_text();
        s.archive.reset();
        return true;
      }
      if (archive_entry_filetype(e) != AE_IFREG) continue;
      const char* p = archive_entry_pathname(e);
      auto [key, ext] = webdataset_split_name(p ? p : "");
      std::string bytes, err;
      const bool keep = !key.empty() && s.kept(ext);
      const int64_t size = archive_entry_size_is_set(e) ? archive_entry_size(e) : -1;
      if (!read_member(a, size, keep, bytes, err)) {
        const std::string msg = fmt::format("corrupt or truncated tar at {}: {}", p ? p : "?", err);
        if (started && !key.empty() && key != out.key) {  // `out` is complete; the next one is not
          s.pending_key = key;
          s.pending_error = msg;
          return true;
        }
        if (!started) out.key = key;
        out.error = msg;
        s.archive.reset();
        return true;
      }
      if (key.empty()) continue;
      if (started && key != out.key) {
        s.has_pending = true;
        s.pending_key = std::move(key);
        s.pending_ext = std::move(ext);
        s.pending_bytes = std::move(bytes);
        return true;
      }
      if (!started) {
        out.key = key;
        started = true;
      }
      if (out.files.count(ext) && out.error.empty())
        out.error = fmt::format("duplicate member {}.{}", key, ext);
      else if (keep)
        out.files[ext] = std::move(bytes);
    }
  }
}

int64_t count_webdataset_samples(const std::vector<std::string>& tars) {
  int64_t n = 0;
  for (const auto& t : tars) {
    std::string err;
    Archive ar(t, err);
    if (!err.empty()) {
      ++n;  // the reader reports it as one unusable sample
      continue;
    }
    std::string last;
    archive_entry* e = nullptr;
    for (;;) {
      const int r = archive_read_next_header(ar.a, &e);
      if (r == ARCHIVE_EOF) break;
      if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
        if (last.empty()) ++n;
        break;
      }
      if (archive_entry_filetype(e) != AE_IFREG) continue;
      const char* p = archive_entry_pathname(e);
      const auto key = webdataset_split_name(p ? p : "").first;
      if (!key.empty() && key != last) {
        ++n;
        last = key;
      }
    }
  }
  return n;
}

void write_tar(const std::string& path,
               const std::vector<std::pair<std::string, std::string>>& members) {
  const std::string tmp = path + ".tmp";
  archive* a = archive_write_new();
  archive_write_set_format_pax_restricted(a);
  if (archive_write_open_filename(a, tmp.c_str()) != ARCHIVE_OK) {
    const std::string msg = archive_error_string(a) ? archive_error_string(a) : "cannot write";
    archive_write_free(a);
    fail("{}: {}", path, msg);
  }
  for (const auto& [name, bytes] : members) {
    archive_entry* e = archive_entry_new();
    archive_entry_set_pathname(e, name.c_str());
    archive_entry_set_size(e, static_cast<la_int64_t>(bytes.size()));
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_perm(e, 0644);
    archive_entry_set_mtime(e, 0, 0);
    const bool ok = archive_write_header(a, e) == ARCHIVE_OK &&
                    (bytes.empty() ||
                     archive_write_data(a, bytes.data(), bytes.size()) ==
                         static_cast<la_ssize_t>(bytes.size()));
    archive_entry_free(e);
    if (!ok) {
      const std::string msg = archive_error_string(a) ? archive_error_string(a) : "write failed";
      archive_write_free(a);
      std::remove(tmp.c_str());
      fail("{}: {}", path, msg);
    }
  }
  const bool closed = archive_write_close(a) == ARCHIVE_OK;
  archive_write_free(a);
  MD_CHECK(closed && std::rename(tmp.c_str(), path.c_str()) == 0, "{}: cannot write the tar", path);
}

}  // namespace microdit
