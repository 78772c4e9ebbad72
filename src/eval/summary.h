// A run's summary (RUN/summary.json): one JSON object whose keys are the checks run on the
// finished model ("recall", "colour", ...), each written by its own command.
#pragma once
#include <nlohmann/json.hpp>

#include <string>

namespace microdit {

// Sets `key` to `value` in the JSON object at `path` (created when missing), atomically.
// A file that is not a JSON object is an Error (it is never overwritten).
void update_summary(const std::string& path, const std::string& key, const nlohmann::ordered_json& value);

}  // namespace microdit
