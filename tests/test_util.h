// Helpers shared by the GoogleTest files.
#pragma once
#include <functional>
#include <string>

#include "core/error.h"
#include "model/config.h"

namespace microdit::test_util {

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
