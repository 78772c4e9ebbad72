#include "eval/torch_legacy.h"

#include <ATen/ATen.h>

#include <cstring>
#include <functional>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "core/error.h"

namespace microdit {

namespace {

struct Value;
using V = std::shared_ptr<Value>;
struct Value {
  enum Kind { None, Int, Float, Str, Tuple, List, Dict, Global, Mark, Storage, TensorRef, Other } kind = None;
  int64_t i = 0;
  double f = 0;
  std::string s, s2;                  // Str; Global module / name; Storage key / class name
  std::vector<V> items;               // Tuple, List; Dict keys and values interleaved
  std::vector<int64_t> size, stride;  // TensorRef
  V storage;                          // TensorRef
};
V make(Value::Kind k) {
  auto v = std::make_shared<Value>();
  v->kind = k;
  return v;
}

class Unpickler {
 public:
  Unpickler(const std::string& b, size_t& pos, std::string where) : b_(b), p_(pos), where_(std::move(where)) {}
  V load() {
    std::vector<V> st;
    std::vector<size_t> marks;
    std::map<int64_t, V> memo;
    auto pop = [&] {
      MD_CHECK(!st.empty(), "{}: corrupt pickle (stack underflow)", where_);
      V v = st.back();
      st.pop_back();
      return v;
    };
    auto pop_mark = [&] {
      MD_CHECK(!marks.empty(), "{}: corrupt pickle (no mark)", where_);
      const size_t m = marks.back();
      marks.pop_back();
      std::vector<V> out(st.begin() + long(m), st.end());
      st.resize(m);
      return out;
    };
    for (;;) {
      const uint8_t op = u8();
      switch (op) {
        case 0x80: u8(); break;  // PROTO
        case '.': return pop();  // STOP
        case '(': marks.push_back(st.size()); break;
        case 'N': st.push_back(make(Value::None)); break;
        case 0x88: case 0x89: { auto v = make(Value::Int); v->i = op == 0x88; st.push_back(v); break; }
        case 'K': { auto v = make(Value::Int); v->i = u8(); st.push_back(v); break; }
        case 'M': { auto v = make(Value::Int); v->i = int64_t(uint16_t(u8() | u8() << 8)); st.push_back(v); break; }
        case 'J': { auto v = make(Value::Int); v->i = int32_t(le(4)); st.push_back(v); break; }
        case 0x8a: {  // LONG1
          const size_t n = u8();
          auto v = make(Value::Int);
          if (n <= 8)
            v->i = int64_t(le(n));
          else
            v->s = str(n);  // the 10-byte magic number
          st.push_back(v);
          break;
        }
        case 'G': {  // BINFLOAT (big-endian)
          uint64_t x = 0;
          for (int k = 0; k < 8; ++k) x = x << 8 | u8();
          auto v = make(Value::Float);
          std::memcpy(&v->f, &x, 8);
          st.push_back(v);
          break;
        }
        case 'X': case 'U': case 'T': case 0x8c: case 'C': case 'B': {  // unicode / bytes strings
          const size_t n = (op == 'U' || op == 0x8c || op == 'C') ? u8() : size_t(le(4));
          auto v = make(Value::Str);
          v->s = str(n);
          st.push_back(v);
          break;
        }
        case 'c': {  // GLOBAL module\nname\n
          auto v = make(Value::Global);
          v->s = line(), v->s2 = line();
          st.push_back(v);
          break;
        }
        case ')': st.push_back(make(Value::Tuple)); break;
        case ']': st.push_back(make(Value::List)); break;
        case '}': st.push_back(make(Value::Dict)); break;
        case 't': { auto v = make(Value::Tuple); v->items = pop_mark(); st.push_back(v); break; }
        case 'l': { auto v = make(Value::List); v->items = pop_mark(); st.push_back(v); break; }
        case 0x85: case 0x86: case 0x87: {
          const size_t n = op - 0x84u;
          auto v = make(Value::Tuple);
          for (size_t k = 0; k < n; ++k) v->items.insert(v->items.begin(), pop());
          st.push_back(v);
          break;
        }
        case 'q': memo[u8()] = st.back(); break;
        case 'r': memo[int64_t(le(4))] = st.back(); break;
        case 'h': case 'j': {
          const int64_t k = op == 'h' ? u8() : int64_t(le(4));
          MD_CHECK(memo.count(k), "{}: corrupt pickle (memo {})", where_, k);
          st.push_back(memo[k]);
          break;
        }
        case 'a': { auto x = pop(); st.back()->items.push_back(x); break; }
        case 'e': { auto xs = pop_mark(); for (auto& x : xs) st.back()->items.push_back(x); break; }
        case 's': { auto val = pop(), key = pop(); st.back()->items.push_back(key), st.back()->items.push_back(val); break; }
        case 'u': { auto xs = pop_mark(); for (auto& x : xs) st.back()->items.push_back(x); break; }
        case 'b': pop(); break;  // BUILD: state of an OrderedDict (_metadata) or a module: ignored
        case 'Q': {              // BINPERSID: ('storage', torch.XStorage, key, location, numel, view)
          auto t = pop();
          MD_CHECK(t->kind == Value::Tuple && t->items.size() >= 3 && t->items[1]->kind == Value::Global,
                   "{}: unsupported persistent id in the pickle", where_);
          auto v = make(Value::Storage);
          v->s = t->items[2]->s, v->s2 = t->items[1]->s2;
          st.push_back(v);
          break;
        }
        case 'R': case 0x81: {  // REDUCE, NEWOBJ
          auto args = pop(), fn = pop();
          st.push_back(reduce(fn, args));
          break;
        }
        default: fail("{}: unsupported pickle opcode 0x{:02x} (not a legacy torch.save state dict?)", where_, op);
      }
    }
  }

 private:
  V reduce(const V& fn, const V& args) {
    const std::string name = fn->kind == Value::Global ? fn->s + "." + fn->s2 : "";
    if (name == "collections.OrderedDict") return make(Value::Dict);
    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor") {
      const auto& a = args->items;
      MD_CHECK(a.size() >= 4 && a[0]->kind == Value::Storage, "{}: malformed tensor in the pickle", where_);
      auto v = make(Value::TensorRef);
      v->storage = a[0];
      v->i = a[1]->i;
      for (auto& x : a[2]->items) v->size.push_back(x->i);
      for (auto& x : a[3]->items) v->stride.push_back(x->i);
      return v;
    }
    if (name == "torch._utils._rebuild_parameter" && !args->items.empty()) return args->items[0];
    return make(Value::Other);
  }
  uint8_t u8() {
    MD_CHECK(p_ < b_.size(), "{}: truncated pickle", where_);
    return uint8_t(b_[p_++]);
  }
  uint64_t le(size_t n) {
    uint64_t x = 0;
    for (size_t k = 0; k < n; ++k) x |= uint64_t(u8()) << (8 * k);
    return x;
  }
  std::string str(size_t n) {
    MD_CHECK(p_ + n <= b_.size(), "{}: truncated pickle", where_);
    std::string s = b_.substr(p_, n);
    p_ += n;
    return s;
  }
  std::string line() {
    const auto e = b_.find('\n', p_);
    MD_CHECK(e != std::string::npos, "{}: truncated pickle", where_);
    std::string s = b_.substr(p_, e - p_);
    p_ = e + 1;
    return s;
  }
  const std::string& b_;
  size_t& p_;
  std::string where_;
};

at::ScalarType storage_dtype(const std::string& cls, const std::string& where) {
  static const std::map<std::string, at::ScalarType> m = {
      {"FloatStorage", at::kFloat}, {"DoubleStorage", at::kDouble}, {"HalfStorage", at::kHalf},
      {"BFloat16Storage", at::kBFloat16}, {"LongStorage", at::kLong}, {"IntStorage", at::kInt},
      {"ShortStorage", at::kShort}, {"CharStorage", at::kChar}, {"ByteStorage", at::kByte}, {"BoolStorage", at::kBool}};
  const auto it = m.find(cls);
  MD_CHECK(it != m.end(), "{}: unsupported storage type torch.{}", where, cls);
  return it->second;
}

void flatten(const V& v, const std::string& prefix, const std::map<std::string, at::Tensor>& storages,
             NamedTensors& out, const std::string& where) {
  if (v->kind == Value::TensorRef) {
    const auto it = storages.find(v->storage->s);
    MD_CHECK(it != storages.end(), "{}: tensor '{}' has no storage data", where, prefix);
    MD_CHECK(v->i >= 0, "{}: bad storage offset", where);
    int64_t need = v->i + 1;
    for (size_t d = 0; d < v->size.size(); ++d) need += (v->size[d] - 1) * v->stride[d];
    MD_CHECK(v->size.empty() || std::count(v->size.begin(), v->size.end(), 0) > 0 || need <= it->second.numel(),
             "{}: tensor '{}' reaches past its storage", where, prefix);
    out.emplace_back(prefix, it->second.as_strided(v->size, v->stride, v->i).clone());
  } else if (v->kind == Value::Dict) {
    for (size_t k = 0; k + 1 < v->items.size(); k += 2) {
      const auto& key = v->items[k];
      const std::string name = key->kind == Value::Str ? key->s : std::to_string(key->i);
      flatten(v->items[k + 1], prefix.empty() ? name : prefix + "." + name, storages, out, where);
    }
  }
}

}  // namespace

bool is_legacy_torch_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char m[2] = {0, 0};
  f.read(m, 2);
  return f.gcount() == 2 && uint8_t(m[0]) == 0x80 && uint8_t(m[1]) == 0x02;
}

NamedTensors read_legacy_torch(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MD_CHECK(in.good(), "{}: no such file", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  const std::string b = ss.str();
  size_t pos = 0;
  const auto magic = Unpickler(b, pos, path).load();
  MD_CHECK(magic->kind == Value::Int && magic->s == std::string("\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19", 10),
           "{}: not a legacy torch.save file (bad magic number)", path);
  const auto proto = Unpickler(b, pos, path).load();
  MD_CHECK(proto->kind == Value::Int && proto->i == 1001, "{}: unsupported legacy torch.save protocol", path);
  Unpickler(b, pos, path).load();  // sys_info: little-endian, type sizes
  const auto root = Unpickler(b, pos, path).load();
  const auto keys = Unpickler(b, pos, path).load();
  MD_CHECK(keys->kind == Value::List, "{}: malformed storage key list", path);
  // Storage classes by key, from the object.
  std::map<std::string, std::string> cls;
  std::function<void(const V&)> walk = [&](const V& v) {
    if (v->kind == Value::TensorRef) cls[v->storage->s] = v->storage->s2;
    for (const auto& x : v->items) walk(x);
  };
  walk(root);
  std::map<std::string, at::Tensor> storages;
  for (const auto& k : keys->items) {
    MD_CHECK(pos + 8 <= b.size(), "{}: truncated storage data", path);
    int64_t n = 0;
    std::memcpy(&n, b.data() + pos, 8);
    pos += 8;
    const auto it = cls.find(k->s);
    const auto type = storage_dtype(it == cls.end() ? "FloatStorage" : it->second, path);
    const size_t bytes = size_t(n) * c10::elementSize(type);
    MD_CHECK(n >= 0 && pos + bytes <= b.size(), "{}: truncated storage data", path);
    auto t = at::empty({n}, at::TensorOptions().dtype(type));
    std::memcpy(t.data_ptr(), b.data() + pos, bytes);
    pos += bytes;
    storages[k->s] = t;
  }
  NamedTensors out;
  flatten(root, "", storages, out, path);
  MD_CHECK(!out.empty(), "{}: no tensors in the legacy torch.save file", path);
  return out;
}

}  // namespace microdit
