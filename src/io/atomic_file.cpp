#include "io/atomic_file.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace microdit {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  tmp_ = path_ + ".tmp." + std::to_string(::getpid());
  f_ = std::fopen(tmp_.c_str(), "wb");
  MD_CHECK(f_ != nullptr, "{}: cannot open for writing ({})", tmp_, std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

void AtomicFile::write(const char* data, size_t size) {
  MD_CHECK(f_ != nullptr, "{}: already committed", path_);
  MD_CHECK(std::fwrite(data, 1, size, f_) == size, "{}: write failed ({})", tmp_,
           std::strerror(errno));
}

void AtomicFile::commit() {
  MD_CHECK(f_ != nullptr, "{}: already committed", path_);
  const bool ok = std::fflush(f_) == 0 && ::fsync(::fileno(f_)) == 0;
  std::fclose(f_);
  f_ = nullptr;
  if (!ok || std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp_.c_str());
    fail("{}: could not write ({})", path_, why);
  }
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  AtomicFile f(path);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

}  // namespace microdit
