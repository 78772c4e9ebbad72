#include "io/safetensors.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "core/error.h"
#include "core/fs.h"
#include "io/atomic_file.h"

namespace microdit {

namespace {

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeInfo kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat},  {"F16", at::kHalf}, {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

at::ScalarType parse_dtype(const std::string& s, const std::string& path, const std::string& key) {
  for (const auto& d : kDtypes)
    if (s == d.name) return d.type;
  fail("{}: tensor '{}' has unsupported dtype '{}'", path, key, s);
}

const char* dtype_name(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return d.name;
  fail("cannot save dtype {} to safetensors", c10::toString(t));
}

}  // namespace

const Tensor* SafetensorsFile::find(const std::string& name) const {
  for (const auto& [k, v] : tensors)
    if (k == name) return &v;
  return nullptr;
}

const Tensor& SafetensorsFile::at(const std::string& name) const {
  const Tensor* t = find(name);
  MD_CHECK(t != nullptr, "tensor '{}' is missing from the file", name);
  return *t;
}

SafetensorsFile read_safetensors(const std::string& path, bool with_data) {
  MD_CHECK(is_regular_file(path), "{}: no such file", path);
  const uint64_t file_size = microdit::file_size(path);
  std::ifstream f(path, std::ios::binary);
  MD_CHECK(f.good(), "{}: cannot open for reading", path);
  MD_CHECK(file_size >= 8, "{}: not a safetensors file (only {} bytes)", path, file_size);
  unsigned char len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  MD_CHECK(header_len > 0 && header_len <= file_size - 8,
           "{}: corrupt or truncated safetensors (header length {} for a {}-byte file)", path,
           header_len, file_size);
  std::string header(header_len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_len));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const std::exception&) {
    fail("{}: corrupt safetensors header (not valid JSON)", path);
  }
  MD_CHECK(j.is_object(), "{}: corrupt safetensors header (not a JSON object)", path);
  const uint64_t data_start = 8 + header_len, data_size = file_size - data_start;

  SafetensorsFile out;
  struct Entry {
    std::string key;
    at::ScalarType type;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  try {
    for (auto& [key, v] : j.items()) {
      if (key == "__metadata__") {
        MD_CHECK(v.is_object(), "{}: __metadata__ must be an object", path);
        for (auto& [mk, mv] : v.items())
          out.metadata[mk] = mv.is_string() ? mv.get<std::string>() : mv.dump();
        continue;
      }
      Entry e{key, parse_dtype(v.at("dtype").get<std::string>(), path, key),
              v.at("shape").get<std::vector<int64_t>>(),
              v.at("data_offsets").at(0).get<uint64_t>(), v.at("data_offsets").at(1).get<uint64_t>()};
      uint64_t numel = 1, bytes = 0;
      for (auto s : e.shape) {
        MD_CHECK(s >= 0, "{}: tensor '{}' has a negative dimension", path, key);
        MD_CHECK(!__builtin_mul_overflow(numel, static_cast<uint64_t>(s), &numel),
                 "{}: tensor '{}' has shape {} whose element count overflows 64 bits", path, key, e.shape);
      }
      MD_CHECK(!__builtin_mul_overflow(numel, c10::elementSize(e.type), &bytes) &&
                   numel <= static_cast<uint64_t>(INT64_MAX),
               "{}: tensor '{}' has shape {} whose size in bytes overflows 64 bits", path, key, e.shape);
      MD_CHECK(e.begin <= e.end && e.end - e.begin == bytes,
               "{}: tensor '{}' has {} bytes of data for shape/dtype needing {}", path, key,
               e.end - e.begin, bytes);
      MD_CHECK(e.end <= data_size,
               "{}: truncated file: tensor '{}' ends at byte {} of a {}-byte data section", path,
               key, e.end, data_size);
      entries.push_back(std::move(e));
    }
  } catch (const nlohmann::json::exception& ex) {
    fail("{}: corrupt safetensors header ({})", path, ex.what());
  }
  if (!with_data) return out;
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  for (auto& e : entries) {
    auto t = at::empty(e.shape, at::TensorOptions().dtype(e.type));
    f.seekg(static_cast<std::streamoff>(data_start + e.begin));
    f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
    MD_CHECK(f.good() || e.end == e.begin, "{}: read error in tensor '{}'", path, e.key);
    out.tensors.emplace_back(e.key, std::move(t));
  }
  return out;
}

void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    auto c = t.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = c.numel() * c.element_size();
    header[name] = {{"dtype", dtype_name(c.scalar_type())},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(c);
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned
  AtomicFile out(path);
  unsigned char len_bytes[8];
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>((n >> (8 * i)) & 0xff);
  out.write(reinterpret_cast<const char*>(len_bytes), 8);
  out.write(h.data(), h.size());
  for (const auto& c : data) out.write(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
  out.commit();
}

}  // namespace microdit
