// The training dashboard's data: runs under the --runs folder, their metrics.jsonl parsed,
// and their sample grids. Only names listed in the runs folder are ever opened.
#include <limits.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <regex>

#include "core/fs.h"
#include "serve/server.h"

namespace microdit::serve {

namespace {

using json = nlohmann::json;

std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : std::string();
}

bool valid_name(const std::string& name) {
  static const std::regex re("[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}");
  return std::regex_match(name, re);
}

double mtime(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<double>(st.st_mtime) : 0;
}

// The newest checkpoint's metadata, read from its header only (8-byte length + JSON).
json checkpoint_metadata(const std::string& run) {
  std::string latest;
  for (const auto& f : list_dir(run + "/checkpoints"))
    if (f.starts_with("step-") && f.ends_with(".safetensors")) latest = f;
  if (latest.empty()) return json::object();
  std::ifstream in(run + "/checkpoints/" + latest, std::ios::binary);
  unsigned char len[8] = {};
  if (!in.read(reinterpret_cast<char*>(len), 8)) return json::object();
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  if (n == 0 || n > (64u << 20)) return json::object();
  std::string header(n, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(n))) return json::object();
  auto j = json::parse(header, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("__metadata__") || !j["__metadata__"].is_object())
    return json::object();
  json out = j["__metadata__"];
  out["file"] = latest;
  return out;
}

// The last 16 MiB of metrics.jsonl at most, one JSON object per line (bad lines skipped).
std::vector<json> read_metrics(const std::string& path) {
  std::vector<json> out;
  std::ifstream in(path, std::ios::binary);
  if (!in) return out;
  const uint64_t size = file_size(path), cap = 16u << 20;
  if (size > cap) {
    in.seekg(static_cast<std::streamoff>(size - cap));
    std::string skip;
    std::getline(in, skip);  // a partial line
  }
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("step") && j["step"].is_number()) out.push_back(std::move(j));
  }
  return out;
}

double num(const json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : NAN;
}

json finite_or_null(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

}  // namespace

std::string run_dir(const std::string& runs, const std::string& name) {
  if (!valid_name(name)) return "";
  bool listed = false;
  for (const auto& n : list_dir(runs)) listed |= n == name;
  if (!listed) return "";
  const std::string root = real_path(runs), dir = real_path(runs + "/" + name);
  if (root.empty() || dir.empty() || !dir.starts_with(root + "/") || !is_directory(dir)) return "";
  if (!is_regular_file(dir + "/metrics.jsonl") && !is_directory(dir + "/checkpoints")) return "";
  return dir;
}

std::vector<std::string> list_runs(const std::string& runs) {
  std::vector<std::string> out;
  for (const auto& n : list_dir(runs))
    if (!run_dir(runs, n).empty()) out.push_back(n);
  return out;
}

std::string run_summary_json(const std::string& runs, const std::string& name) {
  const std::string dir = run_dir(runs, name);
  if (dir.empty()) return "";
  json s{{"name", name}};
  const auto metrics = read_metrics(dir + "/metrics.jsonl");
  double step = 0, loss = NAN, val = NAN, lr = NAN, ips = NAN;
  for (const auto& m : metrics) {
    step = std::max(step, num(m, "step"));
    if (m.contains("loss")) loss = num(m, "loss"), lr = num(m, "lr"), ips = num(m, "images_per_s");
    if (m.contains("val_loss")) val = num(m, "val_loss");
  }
  const auto meta = checkpoint_metadata(dir);
  double total = NAN, batch = NAN;
  if (meta.contains("train_config") && meta["train_config"].is_string()) {
    try {
      auto y = YAML::Load(meta["train_config"].get<std::string>());
      total = y["train"]["steps"].as<double>();
      batch = y["train"]["batch_size"].as<double>();
    } catch (const YAML::Exception&) {
    }
  }
  const double updated = mtime(dir + "/metrics.jsonl");
  const double age = updated > 0 ? std::difftime(std::time(nullptr), static_cast<time_t>(updated)) : NAN;
  s["step"] = step;
  s["total_steps"] = finite_or_null(total);
  s["loss"] = finite_or_null(loss);
  s["val_loss"] = finite_or_null(val);
  s["lr"] = finite_or_null(lr);
  s["images_per_s"] = finite_or_null(ips);
  s["eta_s"] = finite_or_null(ips > 0 && batch > 0 && total >= step ? (total - step) * batch / ips : NAN);
  s["seconds_since_update"] = finite_or_null(age);
  s["training"] = std::isfinite(age) && age < 120 && !(total <= step);
  s["checkpoint"] = meta.value("file", std::string());
  return s.dump();
}

std::string run_metrics_json(const std::string& runs, const std::string& name) {
  const std::string dir = run_dir(runs, name);
  if (dir.empty()) return "";
  json train = json::array(), val = json::array();
  for (const auto& m : read_metrics(dir + "/metrics.jsonl")) {
    if (m.contains("loss"))
      train.push_back({m["step"], finite_or_null(num(m, "loss")), finite_or_null(num(m, "lr")),
                       finite_or_null(num(m, "images_per_s")), finite_or_null(num(m, "grad_norm"))});
    if (m.contains("val_loss")) val.push_back({m["step"], finite_or_null(num(m, "val_loss"))});
  }
  return json{{"name", name},
              {"train_columns", {"step", "loss", "lr", "images_per_s", "grad_norm"}},
              {"train", train},
              {"val_columns", {"step", "val_loss"}},
              {"val", val}}
      .dump();
}

std::string run_samples_json(const std::string& runs, const std::string& name) {
  const std::string dir = run_dir(runs, name);
  if (dir.empty()) return "";
  auto read_prompts = [](const std::string& txt) {
    json p = json::array();
    std::ifstream in(txt);
    std::string line;
    while (std::getline(in, line) && p.size() < 256)
      if (!line.empty()) p.push_back(line);
    return p;
  };
  json grids = json::array();
  static const std::regex step_png("step-([0-9]{1,12})\\.png");
  auto files = list_dir(dir + "/samples");
  for (auto it = files.rbegin(); it != files.rend() && grids.size() < 12; ++it) {  // newest first
    std::smatch m;
    if (!std::regex_match(*it, m, step_png)) continue;
    const std::string base = it->substr(0, it->size() - 4);
    grids.push_back({{"step", std::stoll(m[1].str())},
                     {"url", "/api/runs/" + name + "/files/samples/" + *it},
                     {"prompts", read_prompts(dir + "/samples/" + base + ".txt")}});
  }
  json finals = json::array();
  for (const char* f : {"samples.png", "colour-check.png", "loss.png"})
    if (is_regular_file(dir + "/" + f))
      finals.push_back({{"file", f},
                        {"url", "/api/runs/" + name + "/files/" + f},
                        {"prompts", read_prompts(dir + "/" + f + ".txt")}});
  return json{{"name", name}, {"grids", grids}, {"pictures", finals}}.dump();
}

}  // namespace microdit::serve
