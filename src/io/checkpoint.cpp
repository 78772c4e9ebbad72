#include "io/checkpoint.h"

#include <ATen/ATen.h>
#include <torch/serialize.h>

#include <fstream>
#include <set>

#include "core/error.h"
#include "core/fs.h"

namespace microdit {

bool glob_match(const std::string& p, const std::string& s) {
  size_t pi = 0, si = 0, star = std::string::npos, mark = 0;
  while (si < s.size()) {
    if (pi < p.size() && p[pi] == s[si]) {
      ++pi, ++si;
    } else if (pi < p.size() && p[pi] == '*') {
      star = pi++, mark = si;
    } else if (star != std::string::npos) {
      pi = star + 1, si = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

static void flatten(const c10::IValue& v, const std::string& prefix, NamedTensors& out) {
  if (v.isTensor()) {
    out.emplace_back(prefix, v.toTensor());
  } else if (v.isGenericDict()) {
    for (const auto& kv : v.toGenericDict()) {
      const auto& k = kv.key();
      const std::string name = k.isString() ? k.toStringRef() : (k.isInt() ? std::to_string(k.toInt()) : "?");
      flatten(kv.value(), prefix.empty() ? name : prefix + "." + name, out);
    }
  } else if (v.isList() || v.isTuple()) {
    auto items = v.isList() ? v.toListRef().vec() : v.toTupleRef().elements().vec();
    for (size_t i = 0; i < items.size(); ++i)
      flatten(items[i], prefix.empty() ? std::to_string(i) : prefix + "." + std::to_string(i), out);
  }
}

static NamedTensors read_torch_zip(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  c10::IValue root;
  try {
    root = torch::pickle_load(bytes);
  } catch (const c10::Error& e) {
    fail("{}: not a readable torch.save checkpoint ({})", path,
         first_line(e.what_without_backtrace()));
  }
  NamedTensors out;
  flatten(root, "", out);
  return out;
}

NamedTensors read_checkpoint(const std::string& path, const std::string& anchor) {
  MD_CHECK(is_regular_file(path), "{}: no such file", path);
  char magic[4] = {0, 0, 0, 0};
  {
    std::ifstream f(path, std::ios::binary);
    f.read(magic, 4);
  }
  const bool zip = magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4;
  NamedTensors all = zip ? read_torch_zip(path) : read_safetensors(path).tensors;
  return anchor.empty() ? all : under_anchor(std::move(all), anchor);
}

NamedTensors under_anchor(NamedTensors all, const std::string& anchor) {
  // Find the prefix in front of the anchor key; shortest wins.
  std::optional<std::string> prefix;
  for (const auto& [k, t] : all) {
    if (k.size() >= anchor.size() && k.compare(k.size() - anchor.size(), anchor.size(), anchor) == 0) {
      std::string p = k.substr(0, k.size() - anchor.size());
      if (!p.empty() && p.back() != '.') continue;
      if (!prefix || p.size() < prefix->size()) prefix = p;
    }
  }
  if (!prefix || prefix->empty()) return all;
  NamedTensors out;
  for (auto& [k, t] : all)
    if (k.rfind(*prefix, 0) == 0) out.emplace_back(k.substr(prefix->size()), t);
  return out;
}

NamedTensors state_dict(const torch::nn::Module& module) {
  NamedTensors out;
  for (const auto& p : module.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

static bool allowed(const std::vector<std::string>& patterns, const std::string& key) {
  for (const auto& p : patterns)
    if (glob_match(p, key)) return true;
  return false;
}

LoadReport load_state_dict(torch::nn::Module& module, const NamedTensors& tensors,
                           const LoadOptions& opt, const std::string& source) {
  const std::string where = source.empty() ? "state dict" : source;
  auto targets = state_dict(module);
  std::map<std::string, Tensor> given;
  for (const auto& [k, t] : tensors) given[k] = t;
  LoadReport report;
  std::set<std::string> known;
  // Check everything before touching the module, so a failed load leaves it unchanged.
  for (const auto& [name, dst] : targets) {
    known.insert(name);
    auto it = given.find(name);
    if (it == given.end()) {
      MD_CHECK(opt.non_strict || allowed(opt.allow_missing, name),
               "{}: missing key '{}' (expected shape [{}])", where, name,
               fmt::join(dst.sizes(), ", "));
      report.missing.push_back(name);
      continue;
    }
    MD_CHECK(it->second.sizes() == dst.sizes(),
             "{}: key '{}' has shape [{}] but the model expects [{}]", where, name,
             fmt::join(it->second.sizes(), ", "), fmt::join(dst.sizes(), ", "));
    MD_CHECK(it->second.is_floating_point() == dst.is_floating_point(),
             "{}: key '{}' has dtype {} but the model expects {}", where, name,
             c10::toString(it->second.scalar_type()), c10::toString(dst.scalar_type()));
  }
  for (const auto& [k, t] : tensors) {
    if (known.count(k)) continue;
    MD_CHECK(opt.non_strict || allowed(opt.allow_unexpected, k),
             "{}: unexpected key '{}' (no such parameter or buffer in the model)", where, k);
    report.unexpected.push_back(k);
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, dst] : targets) {
    auto it = given.find(name);
    if (it == given.end()) continue;
    dst.copy_(it->second);
    ++report.loaded;
  }
  return report;
}

}  // namespace microdit
