// Helpers shared by the GoogleTest files.
#pragma once
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>

#include "core/error.h"
#include "model/config.h"

namespace microdit::test_util {

// A fresh folder under /tmp (mkdtemp), removed with its contents at the end of the scope.
// Not std::filesystem::remove_all: LibTorch exports a broken copy that can shadow libstdc++'s.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/microdit_test_XXXXXX";
    const char* made = ::mkdtemp(tmpl);
    path = made ? made : "";
    if (!made) throw std::runtime_error("cannot create a temporary folder under /tmp");
  }
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path + "'").c_str()); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& f) const { return path + "/" + f; }
};

// The message of the microdit::Error that f throws, or "" when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A MicroDiT small enough for unit tests: Pico at 8x8, 16-wide captions, 2 backbone blocks.
inline ModelConfig tiny_config() {
  auto c = preset("MicroDiT_Pico_2");
  c.input_size = 8;
  c.caption_channels = 16;
  c.depth = 2;
  return c;
}

}  // namespace microdit::test_util
