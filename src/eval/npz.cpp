#include "eval/npz.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <zlib.h>

#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>

#include "core/error.h"
#include "io/atomic_file.h"

namespace microdit {

namespace {

struct DtypeCode {
  const char* code;  // without the byte-order character
  at::ScalarType type;
};
constexpr DtypeCode kDtypes[] = {{"f8", at::kDouble}, {"f4", at::kFloat}, {"f2", at::kHalf},
                                 {"i8", at::kLong},   {"i4", at::kInt},   {"i2", at::kShort},
                                 {"i1", at::kChar},   {"u1", at::kByte},  {"b1", at::kBool}};

// The value after 'key': in a .npy header dict, up to the matching delimiter.
std::string header_value(const std::string& h, const std::string& key, const std::string& where) {
  const auto k = h.find("'" + key + "'");
  MD_CHECK(k != std::string::npos, "{}: the .npy header has no '{}'", where, key);
  auto p = h.find(':', k);
  MD_CHECK(p != std::string::npos, "{}: malformed .npy header", where);
  ++p;
  while (p < h.size() && h[p] == ' ') ++p;
  MD_CHECK(p < h.size(), "{}: malformed .npy header", where);
  if (h[p] == '\'' || h[p] == '"') {
    const auto e = h.find(h[p], p + 1);
    MD_CHECK(e != std::string::npos, "{}: malformed .npy header", where);
    return h.substr(p + 1, e - p - 1);
  }
  if (h[p] == '(') {
    const auto e = h.find(')', p);
    MD_CHECK(e != std::string::npos, "{}: malformed .npy header", where);
    return h.substr(p + 1, e - p - 1);
  }
  auto e = h.find_first_of(",}", p);
  return h.substr(p, e - p);
}

uint16_t u16(const std::string& b, size_t o) {
  return uint16_t(uint8_t(b[o]) | uint8_t(b[o + 1]) << 8);
}
uint32_t u32(const std::string& b, size_t o) { return uint32_t(u16(b, o)) | uint32_t(u16(b, o + 2)) << 16; }
uint64_t u64(const std::string& b, size_t o) { return uint64_t(u32(b, o)) | uint64_t(u32(b, o + 4)) << 32; }

void put16(std::string& b, uint16_t v) { b.push_back(char(v & 0xff)), b.push_back(char(v >> 8)); }
void put32(std::string& b, uint32_t v) { put16(b, uint16_t(v & 0xffff)), put16(b, uint16_t(v >> 16)); }

std::string inflate_raw(const std::string& in, size_t out_size, const std::string& where) {
  std::string out(out_size, '\0');
  z_stream zs{};
  MD_CHECK(inflateInit2(&zs, -15) == Z_OK, "{}: zlib initialisation failed", where);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  zs.avail_in = uInt(in.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = uInt(out.size());
  const int rc = inflate(&zs, Z_FINISH);
  const size_t got = zs.total_out;
  inflateEnd(&zs);
  MD_CHECK(rc == Z_STREAM_END && got == out_size, "{}: corrupt deflate data", where);
  return out;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MD_CHECK(in.good(), "{}: cannot open (no such file?)", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

at::Tensor parse_npy(const std::string& b, const std::string& where) {
  MD_CHECK(b.size() >= 10 && b.compare(0, 6, "\x93NUMPY") == 0, "{}: not a .npy array", where);
  const int major = uint8_t(b[6]);
  MD_CHECK(major >= 1 && major <= 3, "{}: unsupported .npy version {}", where, major);
  MD_CHECK(major == 1 || b.size() >= 12, "{}: truncated .npy", where);
  const size_t hlen = major == 1 ? u16(b, 8) : u32(b, 8);
  const size_t start = major == 1 ? 10 : 12;
  MD_CHECK(b.size() >= start + hlen, "{}: truncated .npy header", where);
  const std::string h = b.substr(start, hlen);
  const std::string descr = header_value(h, "descr", where);
  MD_CHECK(descr.size() >= 2, "{}: unsupported dtype '{}'", where, descr);
  MD_CHECK(descr[0] != '>' || descr.substr(1) == "u1" || descr.substr(1) == "i1" || descr.substr(1) == "b1",
           "{}: big-endian dtype '{}' is not supported", where, descr);
  at::ScalarType type = at::kFloat;
  bool found = false;
  for (const auto& d : kDtypes)
    if (descr.substr(1) == d.code) type = d.type, found = true;
  MD_CHECK(found, "{}: unsupported dtype '{}'", where, descr);
  const bool fortran = header_value(h, "fortran_order", where).find("True") != std::string::npos;
  std::vector<int64_t> shape;
  std::stringstream ss(header_value(h, "shape", where));
  for (std::string item; std::getline(ss, item, ',');) {
    if (item.find_first_not_of(" L") == std::string::npos) continue;
    try {
      shape.push_back(std::stoll(item));
    } catch (const std::exception&) {
      fail("{}: malformed shape in the .npy header", where);
    }
    MD_CHECK(shape.back() >= 0, "{}: negative size in the .npy shape", where);
  }
  const int64_t n = std::accumulate(shape.begin(), shape.end(), int64_t(1), std::multiplies<>());
  const size_t bytes = size_t(n) * c10::elementSize(type);
  MD_CHECK(b.size() - start - hlen == bytes, "{}: .npy data is {} bytes, the header promises {}", where,
           b.size() - start - hlen, bytes);
  std::vector<int64_t> stored = shape;
  if (fortran) std::reverse(stored.begin(), stored.end());
  auto t = at::empty(stored, at::TensorOptions().dtype(type));
  if (bytes) std::memcpy(t.data_ptr(), b.data() + start + hlen, bytes);
  if (fortran && t.dim() > 1) {
    std::vector<int64_t> perm(size_t(t.dim()));
    std::iota(perm.rbegin(), perm.rend(), 0);
    t = t.permute(perm).contiguous();
  }
  return t;
}

std::string to_npy(const at::Tensor& t0) {
  const auto t = t0.contiguous().cpu();
  std::string descr;
  for (const auto& d : kDtypes)
    if (d.type == t.scalar_type()) descr = std::string(d.code[0] == 'f' || d.code[0] == 'i' ? "<" : "|") + d.code;
  if (descr == "<i1") descr = "|i1";
  MD_CHECK(!descr.empty(), "cannot store a {} tensor in a .npy file", c10::toString(t.scalar_type()));
  std::string shape;
  for (int64_t i = 0; i < t.dim(); ++i) shape += fmt::format("{}, ", t.size(i));
  if (t.dim() == 1) shape.pop_back();
  else if (t.dim() > 1) shape.resize(shape.size() - 2);
  std::string h = fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': ({}), }}", descr, shape);
  h.append(63 - (10 + h.size()) % 64, ' ');
  h.push_back('\n');
  std::string out = "\x93NUMPY\x01";
  out.push_back('\0');
  put16(out, uint16_t(h.size()));
  out += h;
  out.append(static_cast<const char*>(t.data_ptr()), t.nbytes());
  return out;
}

NpzArrays read_npz(const std::string& path) {
  const std::string z = read_all(path);
  MD_CHECK(z.size() >= 22, "{}: not a .npz file (too short for a zip archive)", path);
  // End of central directory: the last signature within the final 64 KiB + 22 bytes.
  size_t eocd = std::string::npos;
  for (size_t i = z.size() - 22 + 1; i-- > 0 && z.size() - i <= 65557;)
    if (u32(z, i) == 0x06054b50) {
      eocd = i;
      break;
    }
  MD_CHECK(eocd != std::string::npos, "{}: not a .npz file (no zip directory)", path);
  uint64_t count = u16(z, eocd + 10), cd_off = u32(z, eocd + 16);
  if ((count == 0xffff || cd_off == 0xffffffff) && eocd >= 20 && u32(z, eocd - 20) == 0x07064b50) {
    const uint64_t z64 = u64(z, eocd - 12);
    MD_CHECK(z64 + 56 <= z.size() && u32(z, z64) == 0x06064b50, "{}: corrupt zip64 directory", path);
    count = u64(z, z64 + 32);
    cd_off = u64(z, z64 + 48);
  }
  NpzArrays out;
  size_t p = cd_off;
  for (uint64_t e = 0; e < count; ++e) {
    MD_CHECK(p + 46 <= z.size() && u32(z, p) == 0x02014b50, "{}: corrupt zip directory", path);
    const uint16_t method = u16(z, p + 10), nlen = u16(z, p + 28), xlen = u16(z, p + 30), clen = u16(z, p + 32);
    const uint32_t crc = u32(z, p + 16);
    uint64_t csize = u32(z, p + 20), usize = u32(z, p + 24), off = u32(z, p + 42);
    MD_CHECK(p + 46 + nlen + xlen + clen <= z.size(), "{}: corrupt zip directory", path);
    std::string name = z.substr(p + 46, nlen);
    for (size_t x = p + 46 + nlen; x + 4 <= p + 46 + nlen + xlen;) {  // zip64 extra field
      const uint16_t id = u16(z, x), len = u16(z, x + 2);
      if (id == 0x0001) {
        size_t q = x + 4;
        if (usize == 0xffffffff) usize = u64(z, q), q += 8;
        if (csize == 0xffffffff) csize = u64(z, q), q += 8;
        if (off == 0xffffffff) off = u64(z, q);
      }
      x += 4 + len;
    }
    p += 46 + nlen + xlen + clen;
    MD_CHECK(off + 30 <= z.size() && u32(z, off) == 0x04034b50, "{}: corrupt zip entry '{}'", path, name);
    const size_t data = off + 30 + u16(z, off + 26) + u16(z, off + 28);
    MD_CHECK(data + csize <= z.size(), "{}: truncated zip entry '{}'", path, name);
    const std::string where = path + ":" + name;
    std::string bytes;
    if (method == 0) {
      MD_CHECK(csize == usize, "{}: inconsistent sizes", where);
      bytes = z.substr(data, csize);
    } else if (method == 8) {
      bytes = inflate_raw(z.substr(data, csize), usize, where);
    } else {
      fail("{}: unsupported zip compression method {}", where, method);
    }
    MD_CHECK(uint32_t(crc32(0L, reinterpret_cast<const Bytef*>(bytes.data()), uInt(bytes.size()))) == crc,
             "{}: CRC mismatch (corrupt file)", where);
    if (name.size() > 4 && name.ends_with(".npy")) name.resize(name.size() - 4);
    out.emplace_back(name, parse_npy(bytes, where));
  }
  return out;
}

void write_npz(const std::string& path, const NpzArrays& arrays) {
  std::string zip, cd;
  for (const auto& [name0, t] : arrays) {
    const std::string name = name0 + ".npy", data = to_npy(t);
    MD_CHECK(data.size() < 0xffffffffULL && zip.size() < 0xffffffffULL, "{}: arrays over 4 GiB are not supported", path);
    const uint32_t crc = uint32_t(crc32(0L, reinterpret_cast<const Bytef*>(data.data()), uInt(data.size())));
    const uint32_t off = uint32_t(zip.size());
    auto header = [&](std::string& b, bool central) {
      put32(b, central ? 0x02014b50 : 0x04034b50);
      if (central) put16(b, 20);          // version made by
      put16(b, 20);                       // version needed
      put16(b, 0), put16(b, 0);           // flags, method: stored
      put16(b, 0), put16(b, 0x21);        // time, date: 1980-01-01 00:00
      put32(b, crc), put32(b, uint32_t(data.size())), put32(b, uint32_t(data.size()));
      put16(b, uint16_t(name.size())), put16(b, 0);  // name, extra lengths
      if (central) put16(b, 0), put16(b, 0), put16(b, 0), put32(b, 0x01800000), put32(b, off);
      b += name;
    };
    header(zip, false);
    zip += data;
    header(cd, true);
  }
  const uint32_t cd_off = uint32_t(zip.size());
  zip += cd;
  put32(zip, 0x06054b50), put16(zip, 0), put16(zip, 0);
  put16(zip, uint16_t(arrays.size())), put16(zip, uint16_t(arrays.size()));
  put32(zip, uint32_t(cd.size())), put32(zip, cd_off), put16(zip, 0);
  write_file_atomic(path, zip);
}

}  // namespace microdit
