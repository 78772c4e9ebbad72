// One command-line or config value out of a fixed set of names, with the one-line error a user
// sees for anything else: "--moe-dispatch: expected auto, index, gemm or gather, got 'scatter'".
#pragma once
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "core/error.h"

namespace microdit {

template <class T>
T parse_choice(std::string_view option, std::string_view name,
               std::initializer_list<std::pair<std::string_view, T>> choices) {
  std::string names;
  size_t i = 0;
  for (const auto& [text, value] : choices) {
    if (text == name) return value;
    names += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + std::string(text);
    ++i;
  }
  fail("{}: expected {}, got '{}'", option, names, name);
}

}  // namespace microdit
