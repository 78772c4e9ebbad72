// One error type for everything a user can get wrong (bad path, corrupt file, bad config).
// The CLI prints its message on one line and exits non-zero; nothing else is caught there.
#pragma once
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>
#include <string>

namespace microdit {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace microdit

// MD_CHECK(cond, "format {}", args...): throw microdit::Error with the message when cond is false.
#define MD_CHECK(cond, ...)                 \
  do {                                      \
    if (!(cond)) ::microdit::fail(__VA_ARGS__); \
  } while (0)
