// Helpers shared by the GoogleTest files.
#pragma once
#include <functional>
#include <string>

#include "core/error.h"

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

}  // namespace microdit::test_util
