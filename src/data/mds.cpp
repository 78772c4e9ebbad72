#include "data/mds.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>
#include <torch/torch.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

#include "core/error.h"
#include "core/fs.h"
#include "io/atomic_file.h"

static_assert(std::endian::native == std::endian::little, "MDS files are little-endian");

namespace microdit {

using nlohmann::json;

namespace mds {

namespace {

struct NdDtype {
  const char* name;
  int code;
  int bytes;
  at::ScalarType torch;
};
constexpr NdDtype kNdDtypes[] = {
    {"uint8", 8, 1, at::kByte},      {"int8", 9, 1, at::kChar},       {"uint16", 16, 2, at::kUInt16},
    {"int16", 17, 2, at::kShort},    {"float16", 18, 2, at::kHalf},   {"uint32", 32, 4, at::kUInt32},
    {"int32", 33, 4, at::kInt},      {"float32", 34, 4, at::kFloat},  {"uint64", 64, 8, at::kUInt64},
    {"int64", 65, 8, at::kLong},     {"float64", 66, 8, at::kDouble},
};

const NdDtype* dtype_by_name(const std::string& n) {
  for (const auto& d : kNdDtypes)
    if (n == d.name) return &d;
  return nullptr;
}
const NdDtype* dtype_by_code(int c) {
  for (const auto& d : kNdDtypes)
    if (c == d.code) return &d;
  return nullptr;
}
const NdDtype* dtype_by_torch(at::ScalarType t) {
  for (const auto& d : kNdDtypes)
    if (t == d.torch) return &d;
  return nullptr;
}

// Plain encodings (no ":config"), with their fixed sizes (0 = variable).
const std::map<std::string, int>& plain_encodings() {
  static const std::map<std::string, int> m = {
      {"bytes", 0},       {"str", 0},        {"int", 8},         {"uint8", 1},      {"uint16", 2},
      {"uint32", 4},      {"uint64", 8},     {"int8", 1},        {"int16", 2},      {"int32", 4},
      {"int64", 8},       {"float16", 2},    {"float32", 4},     {"float64", 8},    {"str_int", 0},
      {"str_float", 0},   {"str_decimal", 0}, {"pil", 0},        {"jpeg", 0},       {"jpeg_array", 0},
      {"jpegarray", 0},   {"png", 0},        {"list[pil]", 0},   {"list[jpeg]", 0}, {"list[png]", 0},
      {"pkl", 0},         {"json", 0},       {"ndarray", 0}};
  return m;
}

struct NdSpec {
  const NdDtype* dtype = nullptr;     // nullptr: stored in the payload
  std::optional<std::vector<int64_t>> shape;  // nullopt: stored in the payload
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    const size_t p = s.find(sep, start);
    out.push_back(s.substr(start, p - start));
    if (p == std::string::npos) return out;
    start = p + 1;
  }
}

// Parses "ndarray[:dtype[:d0,d1,...]]"; nullopt when `encoding` is not a valid ndarray one.
std::optional<NdSpec> parse_ndarray(const std::string& encoding) {
  if (encoding == "ndarray") return NdSpec{};
  if (encoding.rfind("ndarray:", 0) != 0) return std::nullopt;
  const std::string config = encoding.substr(8);
  if (config.empty()) return NdSpec{};  // Python: "".split(':') is falsy -> no args
  const auto args = split(config, ':');
  if (args.size() > 2) return std::nullopt;
  NdSpec spec;
  spec.dtype = dtype_by_name(args[0]);
  if (!spec.dtype) return std::nullopt;
  if (args.size() == 2) {
    std::vector<int64_t> shape;
    for (const auto& d : split(args[1], ',')) {
      if (d.empty() || d.size() > 12 || !std::all_of(d.begin(), d.end(), ::isdigit)) return std::nullopt;
      const int64_t v = std::stoll(d);
      if (v < 1) return std::nullopt;
      shape.push_back(v);
    }
    spec.shape = shape;
  }
  return spec;
}

void put_u32(std::string& s, uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); }

uint32_t get_u32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

std::string python_float_repr(double v) {
  MD_CHECK(std::isfinite(v), "cannot encode the non-finite number {} as JSON", v);
  return json(v).dump();  // shortest round-trip digits, "1.0", "1e-05": as Python's repr
}

void dump_string(std::string& out, const std::string& s) {
  out += '"';
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20 || c == 0x7f)
            out += fmt::format("\\u{:04x}", c);
          else
            out += static_cast<char>(c);
      }
      ++i;
      continue;
    }
    // UTF-8 -> code point -> \uXXXX (a surrogate pair above the BMP), as ensure_ascii.
    int len = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    MD_CHECK(len && i + len <= s.size(), "string is not valid UTF-8 (byte 0x{:02x} at offset {})", c, i);
    uint32_t cp = c & (0x7f >> len);
    for (int k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      MD_CHECK((cc >> 6) == 2, "string is not valid UTF-8 (byte 0x{:02x} at offset {})", cc, i + k);
      cp = (cp << 6) | (cc & 0x3f);
    }
    i += len;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      out += fmt::format("\\u{:04x}\\u{:04x}", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
    } else {
      out += fmt::format("\\u{:04x}", cp);
    }
  }
  out += '"';
}

void dump(std::string& out, const json& v) {
  switch (v.type()) {
    case json::value_t::null: out += "null"; break;
    case json::value_t::boolean: out += v.get<bool>() ? "true" : "false"; break;
    case json::value_t::number_integer: out += std::to_string(v.get<int64_t>()); break;
    case json::value_t::number_unsigned: out += std::to_string(v.get<uint64_t>()); break;
    case json::value_t::number_float: out += python_float_repr(v.get<double>()); break;
    case json::value_t::string: dump_string(out, v.get_ref<const std::string&>()); break;
    case json::value_t::array: {
      out += '[';
      bool first = true;
      for (const auto& e : v) {
        if (!first) out += ", ";
        first = false;
        dump(out, e);
      }
      out += ']';
      break;
    }
    case json::value_t::object: {  // nlohmann::json keeps keys sorted (byte order = code points)
      out += '{';
      bool first = true;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (!first) out += ", ";
        first = false;
        dump_string(out, it.key());
        out += ": ";
        dump(out, it.value());
      }
      out += '}';
      break;
    }
    default: fail("cannot encode a JSON value of type {}", v.type_name());
  }
}

// ---- xxh64 (seed 0), written from the xxHash specification --------------------------------
constexpr uint64_t P1 = 11400714785074694791ull, P2 = 14029467366897019727ull,
                   P3 = 1609587929392839161ull, P4 = 9650029242287828579ull, P5 = 2870177450012600261ull;
inline uint64_t rd64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint64_t xround(uint64_t acc, uint64_t in) { return std::rotl(acc + in * P2, 31) * P1; }
inline uint64_t xmerge(uint64_t acc, uint64_t v) { return (acc ^ xround(0, v)) * P1 + P4; }

uint64_t xxh64(const std::string& data) {
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  const size_t n = data.size();
  const unsigned char* end = p + n;
  uint64_t h;
  if (n >= 32) {
    uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
    for (; p + 32 <= end; p += 32) {
      v1 = xround(v1, rd64(p));
      v2 = xround(v2, rd64(p + 8));
      v3 = xround(v3, rd64(p + 16));
      v4 = xround(v4, rd64(p + 24));
    }
    h = std::rotl(v1, 1) + std::rotl(v2, 7) + std::rotl(v3, 12) + std::rotl(v4, 18);
    h = xmerge(xmerge(xmerge(xmerge(h, v1), v2), v3), v4);
  } else {
    h = P5;
  }
  h += n;
  for (; p + 8 <= end; p += 8) h = std::rotl(h ^ xround(0, rd64(p)), 27) * P1 + P4;
  if (p + 4 <= end) {
    h = std::rotl(h ^ (static_cast<uint64_t>(get_u32(reinterpret_cast<const char*>(p))) * P1), 23) * P2 + P3;
    p += 4;
  }
  for (; p < end; ++p) h = std::rotl(h ^ (*p * P5), 11) * P1;
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

const EVP_MD* evp_for(const std::string& algo) {
  if (algo == "md5") return EVP_md5();
  if (algo == "sha1") return EVP_sha1();
  if (algo == "sha224") return EVP_sha224();
  if (algo == "sha256") return EVP_sha256();
  if (algo == "sha384") return EVP_sha384();
  if (algo == "sha512") return EVP_sha512();
  return nullptr;
}

}  // namespace

std::string python_json_dumps(const json& value) {
  std::string out;
  dump(out, value);
  return out;
}

bool is_encoding(const std::string& encoding) {
  if (plain_encodings().count(encoding)) return true;
  return parse_ndarray(encoding).has_value();
}

std::optional<int64_t> encoded_size(const std::string& encoding) {
  const auto it = plain_encodings().find(encoding);
  if (it != plain_encodings().end()) return it->second ? std::optional<int64_t>(it->second) : std::nullopt;
  const auto nd = parse_ndarray(encoding);
  MD_CHECK(nd, "unknown MDS encoding '{}'", encoding);
  if (!nd->dtype || !nd->shape) return std::nullopt;
  int64_t n = nd->dtype->bytes;
  for (auto d : *nd->shape) n *= d;
  return n;
}

bool is_supported_hash(const std::string& algo) { return algo == "xxh64" || evp_for(algo) != nullptr; }

std::string hash_hex(const std::string& algo, const std::string& data) {
  if (algo == "xxh64") return fmt::format("{:016x}", xxh64(data));
  const EVP_MD* md = evp_for(algo);
  MD_CHECK(md, "unsupported MDS hash algorithm '{}' (supported: md5, sha1, sha224, sha256, sha384, "
           "sha512, xxh64)", algo);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  MD_CHECK(EVP_Digest(data.data(), data.size(), digest, &len, md, nullptr) == 1, "{} failed", algo);
  std::string hex;
  for (unsigned i = 0; i < len; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

// ---- encoders ------------------------------------------------------------------------------

std::string encode_str(const std::string& utf8) { return utf8; }

std::string encode_int(int64_t v) { return std::string(reinterpret_cast<const char*>(&v), 8); }

namespace {
template <class T>
std::string raw_of(T v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof v);
}
}  // namespace

std::string encode_scalar(const std::string& encoding, double v) {
  if (encoding == "float16") return raw_of(c10::Half(static_cast<float>(v)).x);
  if (encoding == "float32") return raw_of(static_cast<float>(v));
  if (encoding == "float64") return raw_of(v);
  if (encoding == "str_float" || encoding == "str_decimal") return python_float_repr(v);
  MD_CHECK(std::isfinite(v) && v == std::trunc(v), "MDS {} value {} is not an integer", encoding, v);
  return encode_scalar_int(encoding, static_cast<int64_t>(v));
}

std::string encode_scalar_int(const std::string& encoding, int64_t v) {
  auto in = [&](int64_t lo, int64_t hi) {
    MD_CHECK(v >= lo && v <= hi, "MDS {} value {} is out of range", encoding, v);
  };
  if (encoding == "int" || encoding == "int64") return raw_of(v);
  if (encoding == "int8") return in(INT8_MIN, INT8_MAX), raw_of(static_cast<int8_t>(v));
  if (encoding == "int16") return in(INT16_MIN, INT16_MAX), raw_of(static_cast<int16_t>(v));
  if (encoding == "int32") return in(INT32_MIN, INT32_MAX), raw_of(static_cast<int32_t>(v));
  if (encoding == "uint8") return in(0, UINT8_MAX), raw_of(static_cast<uint8_t>(v));
  if (encoding == "uint16") return in(0, UINT16_MAX), raw_of(static_cast<uint16_t>(v));
  if (encoding == "uint32") return in(0, UINT32_MAX), raw_of(static_cast<uint32_t>(v));
  if (encoding == "uint64") return in(0, INT64_MAX), raw_of(static_cast<uint64_t>(v));
  if (encoding == "str_int") return std::to_string(v);
  if (encoding == "float16" || encoding == "float32" || encoding == "float64" ||
      encoding == "str_float" || encoding == "str_decimal")
    return encode_scalar(encoding, static_cast<double>(v));
  fail("MDS encoding '{}' is not a numeric scalar", encoding);
}

std::string encode_json(const json& v) { return python_json_dumps(v); }

std::string encode_ndarray(const std::string& encoding, const at::Tensor& t) {
  const auto spec = parse_ndarray(encoding);
  MD_CHECK(spec, "'{}' is not an ndarray MDS encoding", encoding);
  MD_CHECK(t.defined() && t.dim() > 0, "an MDS ndarray cannot hold a scalar (use a scalar encoding)");
  MD_CHECK(t.numel() > 0, "an MDS ndarray cannot hold 0 elements (shape {})", t.sizes());
  MD_CHECK(t.dim() < 64, "an MDS ndarray has at most 63 axes, got {}", t.dim());
  const NdDtype* d = dtype_by_torch(t.scalar_type());
  MD_CHECK(d, "MDS ndarray: unsupported dtype {}", c10::toString(t.scalar_type()));
  std::string out;
  if (spec->dtype) {
    MD_CHECK(spec->dtype == d, "MDS ndarray: expected dtype {}, got {}", spec->dtype->name, d->name);
  } else {
    out += static_cast<char>(d->code);
  }
  if (spec->shape) {
    MD_CHECK(t.sizes().vec() == *spec->shape, "MDS ndarray: expected shape {}, got {}",
             fmt::join(*spec->shape, ","), t.sizes());
  } else {
    const int64_t mx = *std::max_element(t.sizes().begin(), t.sizes().end());
    const int w = mx < (1 << 8) ? 0 : mx < (1 << 16) ? 1 : mx < (int64_t{1} << 32) ? 2 : 3;
    out += static_cast<char>((t.dim() << 2) | w);
    for (int64_t s : t.sizes()) {
      const uint64_t u = static_cast<uint64_t>(s);
      out.append(reinterpret_cast<const char*>(&u), size_t{1} << w);  // little-endian low bytes
    }
  }
  const auto c = t.detach().to(at::kCPU).contiguous();
  out.append(static_cast<const char*>(c.data_ptr()), c.numel() * d->bytes);
  return out;
}

// ---- decoders ------------------------------------------------------------------------------

at::Tensor decode_ndarray(const std::string& encoding, const std::string& payload, const std::string& what) {
  const auto spec = parse_ndarray(encoding);
  MD_CHECK(spec, "{}: '{}' is not an ndarray MDS encoding", what, encoding);
  size_t pos = 0;
  const NdDtype* d = spec->dtype;
  if (!d) {
    MD_CHECK(payload.size() >= 1, "{}: empty ndarray payload", what);
    d = dtype_by_code(static_cast<unsigned char>(payload[pos++]));
    MD_CHECK(d, "{}: unknown ndarray dtype code {}", what, static_cast<unsigned char>(payload[0]));
  }
  std::vector<int64_t> shape;
  if (spec->shape) {
    shape = *spec->shape;
  } else {
    MD_CHECK(payload.size() >= pos + 1, "{}: ndarray payload too short for its shape header", what);
    const auto b = static_cast<unsigned char>(payload[pos++]);
    const int ndim = b >> 2;
    const size_t w = size_t{1} << (b & 3);
    MD_CHECK(ndim >= 1 && payload.size() >= pos + ndim * w, "{}: bad ndarray shape header", what);
    for (int k = 0; k < ndim; ++k, pos += w) {
      uint64_t v = 0;
      std::memcpy(&v, payload.data() + pos, w);
      MD_CHECK(v >= 1 && v < (uint64_t{1} << 40), "{}: bad ndarray dimension {}", what, v);
      shape.push_back(static_cast<int64_t>(v));
    }
  }
  int64_t numel = 1;
  for (auto s : shape) {
    MD_CHECK(numel <= (int64_t{1} << 40) / s, "{}: ndarray too large", what);
    numel *= s;
  }
  MD_CHECK(payload.size() - pos == static_cast<size_t>(numel) * d->bytes,
           "{}: ndarray of {} {} ({} values) needs {} bytes, the payload has {}", what, d->name,
           fmt::join(shape, "x"), numel, numel * d->bytes, payload.size() - pos);
  auto t = torch::empty(shape, torch::TensorOptions().dtype(d->torch));
  std::memcpy(t.data_ptr(), payload.data() + pos, numel * d->bytes);
  return t;
}

json decode_value(const std::string& encoding, const std::string& payload, const std::string& what) {
  auto fixed = [&](size_t n) {
    MD_CHECK(payload.size() == n, "{}: {} payload has {} bytes, expected {}", what, encoding, payload.size(), n);
  };
  auto text = [&]() -> json {
    try {
      // Validates UTF-8 by dumping through nlohmann (throws on bad UTF-8).
      json j = payload;
      (void)j.dump();
      return j;
    } catch (const json::exception&) {
      fail("{}: {} payload is not valid UTF-8", what, encoding);
    }
  };
  auto num = [&](auto type_tag) {
    using T = decltype(type_tag);
    fixed(sizeof(T));
    T v;
    std::memcpy(&v, payload.data(), sizeof v);
    return json(v);
  };
  if (encoding == "int" || encoding == "int64") return num(int64_t{});
  if (encoding == "int8") return num(int8_t{});
  if (encoding == "int16") return num(int16_t{});
  if (encoding == "int32") return num(int32_t{});
  if (encoding == "uint8") return num(uint8_t{});
  if (encoding == "uint16") return num(uint16_t{});
  if (encoding == "uint32") return num(uint32_t{});
  if (encoding == "uint64") return num(uint64_t{});
  if (encoding == "float32") return num(float{});
  if (encoding == "float64") return num(double{});
  if (encoding == "float16") {
    fixed(2);
    c10::Half h;
    std::memcpy(&h.x, payload.data(), 2);
    return json(static_cast<double>(static_cast<float>(h)));
  }
  if (encoding == "str") return text();
  if (encoding == "str_int") {
    try {
      size_t used = 0;
      const long long v = std::stoll(payload, &used);
      MD_CHECK(used == payload.size(), "{}: bad str_int '{}'", what, payload);
      return json(static_cast<int64_t>(v));
    } catch (const std::logic_error&) {
      fail("{}: bad str_int '{}'", what, payload.substr(0, 40));
    }
  }
  if (encoding == "str_float" || encoding == "str_decimal") {
    try {
      size_t used = 0;
      const double v = std::stod(payload, &used);
      MD_CHECK(used == payload.size(), "{}: bad {} '{}'", what, encoding, payload);
      return json(v);
    } catch (const std::logic_error&) {
      fail("{}: bad {} '{}'", what, encoding, payload.substr(0, 40));
    }
  }
  if (encoding == "json") {
    try {
      return json::parse(payload);
    } catch (const json::exception&) {
      fail("{}: json payload is not valid JSON", what);
    }
  }
  MD_CHECK(encoding != "pkl", "{}: refusing the pkl encoding (Python pickle is unsafe)", what);
  fail("{}: MDS encoding '{}' has no JSON value (read its raw bytes)", what, encoding);
}

at::Tensor float16_tensor(const std::string& bytes, std::vector<int64_t> shape, const std::string& what) {
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  MD_CHECK(bytes.size() == static_cast<size_t>(numel) * 2, "{}: {} bytes of float16 do not make shape ({})",
           what, bytes.size(), fmt::join(shape, ", "));
  auto t = torch::empty(shape, torch::kHalf);
  std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

std::vector<std::pair<std::string, std::string>> latent_schema(bool with_jpg) {
  std::vector<std::pair<std::string, std::string>> c = {
      {"caption", "str"}, {"caption_latents", "bytes"}, {"latents_256", "bytes"}, {"latents_512", "bytes"}};
  if (with_jpg) c.emplace_back("jpg", "jpeg");
  return c;
}

at::Tensor latent_image_tensor(const std::string& bytes, int image_size, const std::string& what) {
  MD_CHECK(image_size > 0 && image_size % 8 == 0, "{}: image size {} is not a multiple of 8", what, image_size);
  const int64_t hw = int64_t{image_size / 8} * (image_size / 8);
  MD_CHECK(bytes.size() % 2 == 0 && bytes.size() / 2 % hw == 0 && !bytes.empty(),
           "{}: {} bytes are not float16 latents of {}x{} (C x {} x {} x 2 bytes)", what, bytes.size(),
           image_size / 8, image_size / 8, image_size / 8, image_size / 8);
  const int64_t c = static_cast<int64_t>(bytes.size() / 2) / hw;
  return float16_tensor(bytes, {c, image_size / 8, image_size / 8}, what);
}

at::Tensor caption_latent_tensor(const std::string& bytes, int64_t width, const std::string& what) {
  MD_CHECK(width > 0 && !bytes.empty() && bytes.size() % (2 * width) == 0,
           "{}: {} bytes are not float16 caption embeddings of width {}", what, bytes.size(), width);
  return float16_tensor(bytes, {1, static_cast<int64_t>(bytes.size()) / (2 * width), width}, what);
}

}  // namespace mds

// ---- small file helpers --------------------------------------------------------------------

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MD_CHECK(in.good(), "{}: cannot open ({})", path, std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MD_CHECK(!in.bad(), "{}: read failed", path);
  return bytes;
}


std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

// "zstd" / "zstd:L" -> level; nullopt for no compression.
int zstd_level(const std::string& compression) {
  if (compression == "zstd") return 3;
  if (compression.rfind("zstd:", 0) == 0) {
    const std::string l = compression.substr(5);
    if (!l.empty() && l.size() <= 2 && std::all_of(l.begin(), l.end(), ::isdigit)) {
      const int v = std::stoi(l);
      if (v >= 1 && v <= 22) return v;
    }
  }
  fail("unsupported MDS compression '{}' for writing (none, zstd or zstd:1..22)", compression);
}

std::string zstd_compress(const std::string& raw, int level) {
  std::string out(ZSTD_compressBound(raw.size()), '\0');
  const size_t n = ZSTD_compress(out.data(), out.size(), raw.data(), raw.size(), level);
  MD_CHECK(!ZSTD_isError(n), "zstd compression failed ({})", ZSTD_getErrorName(n));
  out.resize(n);
  return out;
}

std::string zstd_decompress(const std::string& in, const std::string& what) {
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> ctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  MD_CHECK(ctx, "{}: out of memory", what);
  std::string out;
  std::vector<char> buf(ZSTD_DStreamOutSize());
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  size_t ret = 1;
  while (input.pos < input.size) {
    ZSTD_outBuffer output{buf.data(), buf.size(), 0};
    ret = ZSTD_decompressStream(ctx.get(), &output, &input);
    MD_CHECK(!ZSTD_isError(ret), "{}: corrupt zstd data ({})", what, ZSTD_getErrorName(ret));
    out.append(buf.data(), output.pos);
    if (ret != 0 && output.pos == 0 && input.pos == input.size) break;
  }
  for (int guard = 0; ret != 0 && guard < 1 << 20; ++guard) {  // flush what is buffered
    ZSTD_outBuffer output{buf.data(), buf.size(), 0};
    ret = ZSTD_decompressStream(ctx.get(), &output, &input);
    MD_CHECK(!ZSTD_isError(ret), "{}: corrupt zstd data ({})", what, ZSTD_getErrorName(ret));
    out.append(buf.data(), output.pos);
    if (output.pos == 0) break;
  }
  MD_CHECK(ret == 0, "{}: truncated zstd data", what);
  return out;
}

std::string gzip_decompress(const std::string& in, const std::string& what) {
  z_stream zs{};
  MD_CHECK(inflateInit2(&zs, 16 + MAX_WBITS) == Z_OK, "{}: zlib init failed", what);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  zs.avail_in = static_cast<uInt>(in.size());
  std::string out;
  char buf[1 << 16];
  int rc = Z_OK;
  while (rc == Z_OK) {
    zs.next_out = reinterpret_cast<Bytef*>(buf);
    zs.avail_out = sizeof buf;
    rc = inflate(&zs, Z_NO_FLUSH);
    out.append(buf, sizeof buf - zs.avail_out);
    if (rc == Z_BUF_ERROR && zs.avail_in == 0) break;
  }
  inflateEnd(&zs);
  MD_CHECK(rc == Z_STREAM_END, "{}: corrupt or truncated gzip data", what);
  return out;
}

json config_of(const json& shard) {
  json c = json::object();
  for (const char* k : {"column_encodings", "column_names", "column_sizes", "compression", "format",
                        "hashes", "size_limit", "version"})
    c[k] = shard.contains(k) ? shard[k] : json();
  return c;
}

}  // namespace

// ---- MDSWriter -----------------------------------------------------------------------------

MDSWriter::MDSWriter(std::string dir, const std::vector<std::pair<std::string, std::string>>& columns,
                     MDSWriterOptions options, std::vector<json> finished_shards)
    : dir_(std::move(dir)), options_(std::move(options)), shards_(std::move(finished_shards)) {
  MD_CHECK(!columns.empty(), "{}: an MDS dataset needs at least one column", dir_);
  for (const auto& [name, enc] : columns) {
    MD_CHECK(mds::is_encoding(enc), "{}: column '{}' has unknown MDS encoding '{}'", dir_, name, enc);
    columns_.push_back({name, enc, mds::encoded_size(enc)});
  }
  std::sort(columns_.begin(), columns_.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  for (size_t i = 1; i < columns_.size(); ++i)
    MD_CHECK(columns_[i].name != columns_[i - 1].name, "{}: column '{}' given twice", dir_, columns_[i].name);
  if (options_.compression && options_.compression->empty()) options_.compression.reset();
  if (options_.compression) zstd_level(*options_.compression);  // validates
  MD_CHECK(std::is_sorted(options_.hashes.begin(), options_.hashes.end()),
           "{}: MDS hash algorithms must be sorted ({})", dir_, fmt::join(options_.hashes, ", "));
  for (const auto& h : options_.hashes)
    MD_CHECK(mds::is_supported_hash(h), "{}: unsupported MDS hash algorithm '{}'", dir_, h);
  if (options_.size_limit && *options_.size_limit == 0) options_.size_limit.reset();  // Python: falsy
  if (options_.size_limit)
    MD_CHECK(*options_.size_limit > 0 && *options_.size_limit < (int64_t{1} << 32),
             "{}: size_limit must be in 1 .. 2^32 - 1, got {}", dir_, *options_.size_limit);

  json names = json::array(), encs = json::array(), sizes = json::array();
  for (const auto& c : columns_) {
    names.push_back(c.name);
    encs.push_back(c.encoding);
    sizes.push_back(c.size ? json(*c.size) : json());
  }
  config_ = {{"column_encodings", encs}, {"column_names", names}, {"column_sizes", sizes},
             {"compression", options_.compression ? json(*options_.compression) : json()},
             {"format", "mds"}, {"hashes", options_.hashes},
             {"size_limit", options_.size_limit ? json(*options_.size_limit) : json()}, {"version", 2}};
  config_json_ = mds::python_json_dumps(config_);
  MD_CHECK(make_dirs(dir_), "{}: cannot create the folder", dir_);
  for (size_t i = 0; i < shards_.size(); ++i) {
    const auto& s = shards_[i];
    MD_CHECK(s.is_object() && config_of(s) == config_,
             "{}: cannot resume: finished shard {} was written with another MDS configuration", dir_, i);
    const json& file = options_.compression ? s["zip_data"] : s["raw_data"];
    MD_CHECK(file.is_object() && file.contains("basename") && file.contains("bytes"),
             "{}: cannot resume: finished shard {} has no file entry", dir_, i);
    const std::string path = join_path(dir_, file["basename"].get<std::string>());
    MD_CHECK(is_regular_file(path) && file_size(path) == file["bytes"].get<uint64_t>(),
             "{}: cannot resume: shard file is missing or has the wrong size", path);
  }
  pending_size_ = 8 + static_cast<int64_t>(config_json_.size());
}

MDSWriter::~MDSWriter() = default;

int MDSWriter::column_index(const std::string& name) const {
  for (size_t i = 0; i < columns_.size(); ++i)
    if (columns_[i].name == name) return static_cast<int>(i);
  return -1;
}

int64_t MDSWriter::flushed_samples() const {
  int64_t n = 0;
  for (const auto& s : shards_) n += s["samples"].get<int64_t>();
  return n;
}

void MDSWriter::write(const std::vector<std::string>& payloads) {
  MD_CHECK(payloads.size() == columns_.size(), "{}: MDS sample has {} payloads for {} columns", dir_,
           payloads.size(), columns_.size());
  std::string sample;
  size_t body = 0;
  for (size_t i = 0; i < columns_.size(); ++i) {
    const auto& c = columns_[i];
    if (c.size) {
      MD_CHECK(static_cast<int64_t>(payloads[i].size()) == *c.size,
               "{}: column '{}' ({}) needs {} bytes, got {}", dir_, c.name, c.encoding, *c.size, payloads[i].size());
    } else {
      MD_CHECK(payloads[i].size() < (uint64_t{1} << 32), "{}: column '{}' payload too large", dir_, c.name);
      mds::put_u32(sample, static_cast<uint32_t>(payloads[i].size()));
    }
    body += payloads[i].size();
  }
  sample.reserve(sample.size() + body);
  for (const auto& p : payloads) sample += p;
  const int64_t add = static_cast<int64_t>(sample.size()) + 4;
  if (options_.size_limit && *options_.size_limit < pending_size_ + add) {
    flush_shard();  // even when empty: streaming writes a 0-sample shard then
  }
  MD_CHECK(pending_size_ + add < (int64_t{1} << 32),
           "{}: MDS shard would exceed 4 GiB (offsets are uint32); set a size_limit", dir_);
  pending_.push_back(std::move(sample));
  pending_size_ += add;
}

void MDSWriter::flush_shard() {
  const uint32_t n = static_cast<uint32_t>(pending_.size());
  std::string raw;
  raw.reserve(pending_size_);
  mds::put_u32(raw, n);
  uint32_t off = 4 + 4 * (n + 1) + static_cast<uint32_t>(config_json_.size());
  mds::put_u32(raw, off);
  for (const auto& s : pending_) mds::put_u32(raw, off += static_cast<uint32_t>(s.size()));
  raw += config_json_;
  for (const auto& s : pending_) raw += s;
  MD_CHECK(static_cast<int64_t>(raw.size()) == pending_size_, "internal: MDS shard size mismatch");
  const std::string raw_name = fmt::format("shard.{:05}.mds", shards_.size());
  auto info = [&](const std::string& name, const std::string& data) {
    json h = json::object();
    for (const auto& a : options_.hashes) h[a] = mds::hash_hex(a, data);
    return json{{"basename", name}, {"bytes", data.size()}, {"hashes", h}};
  };
  json entry = config_;
  entry["samples"] = n;
  entry["raw_data"] = info(raw_name, raw);
  if (options_.compression) {
    const std::string zip = zstd_compress(raw, zstd_level(*options_.compression));
    const std::string zip_name = raw_name + ".zstd";
    entry["zip_data"] = info(zip_name, zip);
    write_file_atomic(join_path(dir_, zip_name), zip);
  } else {
    entry["zip_data"] = nullptr;
    write_file_atomic(join_path(dir_, raw_name), raw);
  }
  shards_.push_back(std::move(entry));
  pending_.clear();
  pending_size_ = 8 + static_cast<int64_t>(config_json_.size());
}

void MDSWriter::flush() {
  if (!pending_.empty()) flush_shard();
}

void MDSWriter::write_index() const {
  const json index = {{"shards", shards_}, {"version", 2}};
  write_file_atomic(join_path(dir_, "index.json"), mds::python_json_dumps(index));
}

void MDSWriter::finish() {
  flush();
  write_index();
}

// ---- merge_index -----------------------------------------------------------------------------

namespace {
json read_index(const std::string& dir) {
  const std::string path = join_path(dir, "index.json");
  MD_CHECK(is_regular_file(path), "{}: no such file (not an MDS dataset folder)", path);
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({})", path, std::string(e.what()).substr(0, 120));
  }
  MD_CHECK(j.is_object() && j.contains("shards") && j["shards"].is_array(), "{}: no \"shards\" list", path);
  MD_CHECK(j.value("version", json()) == json(2), "{}: MDS index version {} (only version 2 is read)", path,
           j.value("version", json()).dump());
  return j;
}
}  // namespace

void mds_merge_index(const std::string& root, const std::vector<std::string>& subdirs) {
  std::string out = "{\"version\": 2, \"shards\": [";
  bool first = true;
  for (const auto& sub : subdirs) {
    json idx = read_index(join_path(root, sub));
    for (auto& s : idx["shards"]) {
      for (const char* key : {"raw_data", "zip_data", "raw_meta", "zip_meta"})
        if (s.contains(key) && s[key].is_object())
          s[key]["basename"] = join_path(sub, s[key]["basename"].get<std::string>());
      if (!first) out += ", ";
      first = false;
      out += mds::python_json_dumps(s);
    }
  }
  out += "]}";
  write_file_atomic(join_path(root, "index.json"), out);
}

bool is_mds_dir(const std::string& dir) {
  try {
    const json j = read_index(dir);
    for (const auto& s : j["shards"])
      if (!s.is_object() || s.value("format", "") != "mds") return false;
    return true;
  } catch (const Error&) {
    return false;
  } catch (const json::exception&) {
    return false;
  }
}

// ---- MDSDataset ------------------------------------------------------------------------------

struct MDSDataset::Impl {
  struct Open {
    int fd = -1;
    uint64_t size = 0;
    ~Open() {
      if (fd >= 0) ::close(fd);
    }
  };
  MDSReadOptions options;
  bool own_decompress_dir = false;
  std::mutex mu;                  // guards open/lru
  std::mutex decompress_mu;       // one decompression at a time
  std::unordered_map<size_t, std::pair<std::shared_ptr<Open>, std::list<size_t>::iterator>> open;
  std::list<size_t> lru;          // most recent first
  std::vector<std::string> made;  // decompressed files we created in our own folder
};

MDSDataset::MDSDataset(std::vector<std::string> dirs, MDSReadOptions options)
    : dirs_(std::move(dirs)), impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  MD_CHECK(!dirs_.empty(), "no MDS dataset folder given");
  bool have_columns = false;
  std::string columns_from;
  for (size_t si = 0; si < dirs_.size(); ++si) {
    const std::string& dir = dirs_[si];
    const std::string index_path = join_path(dir, "index.json");
    stream_begin_.push_back(total_);
    const json idx = read_index(dir);
    for (size_t k = 0; k < idx["shards"].size(); ++k) {
      const json& s = idx["shards"][k];
      auto where = [&] { return fmt::format("{} (shard {})", index_path, k); };
      MD_CHECK(s.is_object(), "{}: shard entry is not an object", where());
      MD_CHECK(s.value("version", json()) == json(2), "{}: shard version {} (only 2 is read)", where(),
               s.value("version", json()).dump());
      const std::string format = s.value("format", std::string());
      MD_CHECK(format == "mds", "{}: shard format '{}' (only MDS shards are read)", where(), format);
      std::vector<MDSColumn> cols;
      try {
        const auto& names = s.at("column_names");
        const auto& encs = s.at("column_encodings");
        const auto& sizes = s.at("column_sizes");
        MD_CHECK(names.size() == encs.size() && names.size() == sizes.size() && !names.empty(),
                 "{}: column lists of different lengths", where());
        for (size_t c = 0; c < names.size(); ++c) {
          MDSColumn col{names[c].get<std::string>(), encs[c].get<std::string>(), std::nullopt};
          MD_CHECK(col.encoding != "pkl", "{}: column '{}' uses the pkl encoding (Python pickle), which is "
                   "unsafe and not read", where(), col.name);
          MD_CHECK(mds::is_encoding(col.encoding), "{}: column '{}' has unknown encoding '{}'", where(),
                   col.name, col.encoding);
          col.size = mds::encoded_size(col.encoding);
          const std::optional<int64_t> declared =
              sizes[c].is_null() ? std::nullopt : std::optional<int64_t>(sizes[c].get<int64_t>());
          MD_CHECK(declared == col.size, "{}: column '{}' size does not match its encoding '{}'", where(),
                   col.name, col.encoding);
          cols.push_back(std::move(col));
        }
      } catch (const json::exception& e) {
        fail("{}: malformed column lists ({})", where(), std::string(e.what()).substr(0, 100));
      }
      if (!have_columns) {
        columns_ = cols;
        have_columns = true;
        columns_from = where();
      } else {
        bool same = cols.size() == columns_.size();
        for (size_t c = 0; same && c < cols.size(); ++c)
          same = cols[c].name == columns_[c].name && cols[c].encoding == columns_[c].encoding;
        MD_CHECK(same, "{}: columns differ from those of {}", where(), columns_from);
      }
      Shard sh;
      try {
        sh.samples = s.at("samples").get<int64_t>();
        MD_CHECK(sh.samples >= 0, "{}: negative sample count", where());
        const json& raw = s.at("raw_data");
        sh.raw_bytes = raw.at("bytes").get<int64_t>();
        const std::string raw_path = join_path(dir, raw.at("basename").get<std::string>());
        sh.compression = s.value("compression", json()).is_string() ? s["compression"].get<std::string>() : "";
        if (is_regular_file(raw_path)) {
          sh.raw_path = sh.path = raw_path;
        } else {
          const json& zip = s.contains("zip_data") ? s["zip_data"] : json();
          MD_CHECK(zip.is_object(), "{}: missing shard file", raw_path);
          sh.zip_path = join_path(dir, zip.at("basename").get<std::string>());
          MD_CHECK(is_regular_file(sh.zip_path), "{}: missing shard file (nor is {} there)", sh.zip_path, raw_path);
          const std::string& comp = sh.compression;
          MD_CHECK(comp.rfind("zstd", 0) == 0 || comp.rfind("gz", 0) == 0,
                   "{}: compression '{}' is not supported (zstd and gz are read)", sh.zip_path, comp);
        }
      } catch (const json::exception& e) {
        fail("{}: malformed shard entry ({})", where(), std::string(e.what()).substr(0, 100));
      }
      if (sh.samples == 0) continue;
      sh.begin = total_;
      sh.entry = s;
      total_ += sh.samples;
      shards_.push_back(std::move(sh));
    }
  }
  stream_begin_.push_back(total_);
  if (!have_columns) columns_.clear();
}

MDSDataset::~MDSDataset() {
  if (!impl_) return;
  impl_->open.clear();
  if (impl_->own_decompress_dir) {
    for (const auto& f : impl_->made) ::unlink(f.c_str());
    ::rmdir(impl_->options.decompress_dir.c_str());
  }
}

int MDSDataset::column_index(const std::string& name) const {
  for (size_t i = 0; i < columns_.size(); ++i)
    if (columns_[i].name == name) return static_cast<int>(i);
  return -1;
}

int64_t MDSDataset::stream_size(int stream) const {
  MD_CHECK(stream >= 0 && stream + 1 < static_cast<int>(stream_begin_.size()), "no MDS stream {}", stream);
  return stream_begin_[stream + 1] - stream_begin_[stream];
}

int64_t MDSDataset::stream_begin(int stream) const {
  MD_CHECK(stream >= 0 && stream + 1 < static_cast<int>(stream_begin_.size()), "no MDS stream {}", stream);
  return stream_begin_[stream];
}

namespace {

void pread_all(int fd, char* buf, size_t n, uint64_t off, const std::string& path) {
  while (n > 0) {
    const ssize_t r = ::pread(fd, buf, n, static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    MD_CHECK(r > 0, "corrupt MDS shard {}: read past its end at byte {} ({})", path, off,
             r < 0 ? std::strerror(errno) : "end of file");
    buf += r;
    n -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
}

}  // namespace

std::vector<std::string> MDSDataset::read(int64_t i, const std::vector<int>& wanted) const {
  MD_CHECK(i >= 0 && i < total_, "MDS sample {} is out of range (the dataset has {})", i, total_);
  const auto it = std::upper_bound(shards_.begin(), shards_.end(), i,
                                   [](int64_t v, const Shard& s) { return v < s.begin; });
  const size_t si = static_cast<size_t>(it - shards_.begin()) - 1;
  const Shard& sh = shards_[si];
  const int64_t local = i - sh.begin;
  Impl& im = *impl_;

  // An open handle for the shard (decompressing it first when only the zip file exists).
  std::shared_ptr<Impl::Open> f;
  {
    std::lock_guard lock(im.mu);
    auto found = im.open.find(si);
    if (found != im.open.end()) {
      im.lru.splice(im.lru.begin(), im.lru, found->second.second);
      f = found->second.first;
    }
  }
  std::string path = sh.raw_path;
  if (!f) {
    if (path.empty()) {
      std::lock_guard lock(im.decompress_mu);
      if (im.options.decompress_dir.empty()) {
        const char* tmp = std::getenv("TMPDIR");
        std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/microdit-mds-XXXXXX";
        MD_CHECK(::mkdtemp(tmpl.data()), "cannot create a folder for decompressed MDS shards in {} ({})",
                 tmp && *tmp ? tmp : "/tmp", std::strerror(errno));
        im.options.decompress_dir = tmpl;
        im.own_decompress_dir = true;
      }
      MD_CHECK(make_dirs(im.options.decompress_dir), "{}: cannot create the folder", im.options.decompress_dir);
      std::string flat = sh.zip_path;
      std::replace(flat.begin(), flat.end(), '/', '_');
      if (flat.size() > 200) flat = flat.substr(flat.size() - 200);
      const std::string ext = "." + sh.zip_path.substr(sh.zip_path.rfind('.') + 1);
      if (flat.ends_with(ext)) flat.resize(flat.size() - ext.size());
      path = join_path(im.options.decompress_dir, flat);
      if (!(is_regular_file(path) && static_cast<int64_t>(file_size(path)) == sh.raw_bytes)) {
        const std::string zip = read_file(sh.zip_path);
        const std::string raw = sh.compression.rfind("zstd", 0) == 0 ? zstd_decompress(zip, sh.zip_path)
                                                                     : gzip_decompress(zip, sh.zip_path);
        MD_CHECK(static_cast<int64_t>(raw.size()) == sh.raw_bytes,
                 "corrupt MDS shard {}: decompresses to {} bytes, index.json says {}", sh.zip_path, raw.size(),
                 sh.raw_bytes);
        write_file_atomic(path, raw);
        if (im.own_decompress_dir) im.made.push_back(path);
      }
    }
    auto opened = std::make_shared<Impl::Open>();
    opened->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    MD_CHECK(opened->fd >= 0, "{}: cannot open ({})", path, std::strerror(errno));
    struct stat st;
    MD_CHECK(::fstat(opened->fd, &st) == 0, "{}: cannot stat", path);
    opened->size = static_cast<uint64_t>(st.st_size);
    MD_CHECK(static_cast<int64_t>(opened->size) == sh.raw_bytes,
             "corrupt MDS shard {}: {} bytes, index.json says {}", path, opened->size, sh.raw_bytes);
    char head[4];
    MD_CHECK(opened->size >= 8, "corrupt MDS shard {}: too short", path);
    pread_all(opened->fd, head, 4, 0, path);
    MD_CHECK(static_cast<int64_t>(mds::get_u32(head)) == sh.samples,
             "corrupt MDS shard {}: holds {} samples, index.json says {}", path, mds::get_u32(head), sh.samples);
    MD_CHECK(opened->size >= 4 + 4 * static_cast<uint64_t>(sh.samples + 1),
             "corrupt MDS shard {}: too short for its offsets", path);
    char last[4];
    pread_all(opened->fd, last, 4, 4 + 4 * static_cast<uint64_t>(sh.samples), path);
    MD_CHECK(mds::get_u32(last) == opened->size, "corrupt MDS shard {}: ends at byte {} but has {} bytes", path,
             mds::get_u32(last), opened->size);
    if (impl_->options.verify_hashes) {  // raw_data hashes: of the raw (decompressed) bytes
      const json& hashes = sh.entry["raw_data"].value("hashes", json::object());
      std::string data;
      for (auto h = hashes.begin(); h != hashes.end(); ++h) {
        if (!mds::is_supported_hash(h.key())) continue;
        if (data.empty()) data = read_file(path);
        MD_CHECK(mds::hash_hex(h.key(), data) == h.value().get<std::string>(),
                 "corrupt MDS shard {}: {} hash mismatch", path, h.key());
      }
    }
    std::lock_guard lock(im.mu);
    auto found = im.open.find(si);
    if (found != im.open.end()) {
      f = found->second.first;
    } else {
      im.lru.push_front(si);
      im.open.emplace(si, std::make_pair(opened, im.lru.begin()));
      f = opened;
      while (static_cast<int>(im.open.size()) > std::max(1, im.options.max_open_files)) {
        im.open.erase(im.lru.back());
        im.lru.pop_back();
      }
    }
  }
  if (path.empty()) path = sh.zip_path;

  char pair[8];
  pread_all(f->fd, pair, 8, 4 * (1 + static_cast<uint64_t>(local)), path);
  const uint64_t begin = mds::get_u32(pair), end = mds::get_u32(pair + 4);
  const uint64_t header_end = 4 + 4 * static_cast<uint64_t>(sh.samples + 1);
  MD_CHECK(begin >= header_end && begin <= end && end <= f->size,
           "corrupt MDS shard {}: sample {} has offsets {}..{} (file of {} bytes)", path, local, begin, end, f->size);
  // The size header of the variable columns, then every column's place in the sample.
  size_t nvar = 0;
  for (const auto& c : columns_) nvar += !c.size;
  const uint64_t len = end - begin;
  MD_CHECK(len >= 4 * nvar, "corrupt MDS shard {}: sample {} too short for its size header", path, local);
  std::string head(4 * nvar, '\0');
  if (nvar) pread_all(f->fd, head.data(), head.size(), begin, path);
  std::vector<uint64_t> pos(columns_.size() + 1);
  pos[0] = 4 * nvar;
  for (size_t c = 0, k = 0; c < columns_.size(); ++c) {
    const uint64_t n = columns_[c].size ? static_cast<uint64_t>(*columns_[c].size) : mds::get_u32(&head[4 * k++]);
    pos[c + 1] = pos[c] + n;
    MD_CHECK(pos[c + 1] <= len, "corrupt MDS shard {}: sample {} column '{}' overruns the sample", path, local,
             columns_[c].name);
  }
  MD_CHECK(pos.back() == len, "corrupt MDS shard {}: sample {} has {} stray bytes", path, local, len - pos.back());
  std::vector<std::string> out;
  if (wanted.empty()) {  // everything: one read
    std::string data(len - pos[0], '\0');
    if (!data.empty()) pread_all(f->fd, data.data(), data.size(), begin + pos[0], path);
    for (size_t c = 0; c < columns_.size(); ++c) out.push_back(data.substr(pos[c] - pos[0], pos[c + 1] - pos[c]));
    return out;
  }
  for (int c : wanted) {
    MD_CHECK(c >= 0 && c < static_cast<int>(columns_.size()), "no MDS column {}", c);
    std::string v(pos[c + 1] - pos[c], '\0');
    if (!v.empty()) pread_all(f->fd, v.data(), v.size(), begin + pos[c], path);
    out.push_back(std::move(v));
  }
  return out;
}

std::vector<std::string> MDSDataset::get_raw(int64_t i) const { return read(i, {}); }

std::vector<std::string> MDSDataset::get_columns(int64_t i, const std::vector<int>& columns) const {
  MD_CHECK(!columns.empty(), "no MDS columns asked for");
  return read(i, columns);
}

std::string MDSDataset::get(int64_t i, const std::string& column) const {
  const int c = column_index(column);
  MD_CHECK(c >= 0, "the MDS dataset has no column '{}' (columns: {})", column, [&] {
    std::vector<std::string> n;
    for (const auto& col : columns_) n.push_back(col.name);
    return fmt::format("{}", fmt::join(n, ", "));
  }());
  return read(i, {c})[0];
}

}  // namespace microdit
