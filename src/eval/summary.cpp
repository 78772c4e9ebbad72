#include "eval/summary.h"

#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "io/atomic_file.h"

namespace microdit {

void update_summary(const std::string& path, const std::string& key, const nlohmann::ordered_json& value) {
  nlohmann::ordered_json all = nlohmann::ordered_json::object();
  if (is_regular_file(path)) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    all = nlohmann::ordered_json::parse(ss.str(), nullptr, false);
    MD_CHECK(!all.is_discarded() && all.is_object(), "{}: not a JSON object (not a run summary?)", path);
  }
  all[key] = value;
  write_file_atomic(path, all.dump(2) + "\n");
}

}  // namespace microdit
