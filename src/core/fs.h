// Minimal file queries on POSIX stat. LibTorch's shared library exports its own copy of
// std::filesystem, which can shadow libstdc++'s at run time; these helpers avoid it.
#pragma once
#include <sys/stat.h>

#include <cstdint>
#include <string>

namespace microdit {

inline bool is_regular_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

inline uint64_t file_size(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

}  // namespace microdit
