// Write-then-rename: readers never see a half-written file. The temporary file is removed
// if commit() is not reached (an exception, an interrupted run).
#pragma once
#include <cstdio>
#include <string>

namespace microdit {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const char* data, size_t size);
  void commit();  // flush, fsync, rename over the target
  const std::string& temp_path() const { return tmp_; }

 private:
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
};

// The whole file at once: AtomicFile's write and commit.
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace microdit
