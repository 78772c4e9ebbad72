#include "text/bpe.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "text/unicode.h"

namespace microdit::text {

namespace {

constexpr size_t kMerges = 49152 - 256 - 2;

std::string read_gzip(const std::string& path) {
  MD_CHECK(is_regular_file(path), "BPE vocabulary file not found: {}", path);
  gzFile f = gzopen(path.c_str(), "rb");
  MD_CHECK(f, "cannot open BPE vocabulary file {}", path);
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.append(buf, size_t(n));
  int err = 0;
  const char* msg = gzerror(f, &err);
  const bool ok = n == 0 && err == Z_OK;
  const std::string why = msg ? msg : "";
  gzclose(f);
  MD_CHECK(ok, "BPE vocabulary file {} is not a readable gzip file ({})", path, why);
  return out;
}

// Windows-1252 for 0x80..0x9F (ftfy's fix_c1_controls; undefined bytes map to themselves).
constexpr char32_t kCp1252[32] = {
    0x20AC, 0x81,   0x201A, 0x192,  0x201E, 0x2026, 0x2020, 0x2021, 0x2C6,  0x2030, 0x160,
    0x2039, 0x152,  0x8D,   0x17D,  0x8F,   0x90,   0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x2DC,  0x2122, 0x161,  0x203A, 0x153,  0x9D,   0x17E,  0x178};

// html.unescape for numeric references and the common named entities.
std::u32string html_unescape(const std::u32string& s) {
  static const std::map<std::u32string, std::u32string> named = {
      {U"amp", U"&"},        {U"lt", U"<"},         {U"gt", U">"},         {U"quot", U"\""},
      {U"apos", U"'"},       {U"nbsp", U"\u00a0"},  {U"hellip", U"\u2026"}, {U"mdash", U"\u2014"},
      {U"ndash", U"\u2013"}, {U"lsquo", U"\u2018"}, {U"rsquo", U"\u2019"}, {U"ldquo", U"\u201c"},
      {U"rdquo", U"\u201d"}, {U"copy", U"\u00a9"},  {U"reg", U"\u00ae"},   {U"trade", U"\u2122"},
      {U"deg", U"\u00b0"},   {U"times", U"\u00d7"}, {U"eacute", U"\u00e9"}, {U"egrave", U"\u00e8"},
      {U"euro", U"\u20ac"},  {U"pound", U"\u00a3"}, {U"laquo", U"\u00ab"}, {U"raquo", U"\u00bb"},
      {U"middot", U"\u00b7"}, {U"bull", U"\u2022"}};
  // Entities html.unescape also accepts without the ';'.
  static const std::vector<std::u32string> bare = {U"amp", U"lt", U"gt", U"quot", U"nbsp",
                                                   U"copy", U"reg", U"deg", U"times"};
  std::u32string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != U'&') {
      out.push_back(s[i]);
      continue;
    }
    size_t j = i + 1;
    if (j < s.size() && s[j] == U'#') {  // &#NNN; or &#xHHH; (';' optional)
      bool hex = j + 1 < s.size() && (s[j + 1] == U'x' || s[j + 1] == U'X');
      size_t k = j + 1 + hex, start = k;
      uint64_t v = 0;
      while (k < s.size() && k - start < 12 &&
             (hex ? std::isxdigit(int(s[k] < 128 ? s[k] : 0)) : (s[k] >= U'0' && s[k] <= U'9'))) {
        const char32_t c = s[k];
        v = v * (hex ? 16 : 10) + (c <= U'9' ? c - U'0' : (c | 0x20) - U'a' + 10);
        ++k;
      }
      if (k == start) {
        out.push_back(s[i]);
        continue;
      }
      if (k < s.size() && s[k] == U';') ++k;
      char32_t c;
      if (v >= 0x80 && v <= 0x9F) c = kCp1252[v - 0x80];
      else if (v == 0 || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) c = 0xFFFD;
      else c = char32_t(v);
      out.push_back(c);
      i = k - 1;
      continue;
    }
    size_t k = j;
    while (k < s.size() && k - j < 32 && s[k] < 128 && std::isalnum(int(s[k]))) ++k;
    const std::u32string name = s.substr(j, k - j);
    if (k < s.size() && s[k] == U';' && named.count(name)) {
      out += named.at(name);
      i = k;
      continue;
    }
    bool done = false;  // longest legacy name that prefixes the run, no ';' needed
    for (size_t len = name.size(); len > 0 && !done; --len)
      for (const auto& b : bare)
        if (b.size() == len && name.compare(0, len, b) == 0) {
          out += named.at(b);
          i = j + len - 1;
          done = true;
          break;
        }
    if (!done) out.push_back(s[i]);
  }
  return out;
}

// One pass of the ftfy fixes we reproduce (no mojibake repair): HTML unescaping (when the
// text has no '<'), C1 controls as Windows-1252, Latin ligatures, full/half width forms,
// curly quotes, line breaks, terminal escapes, control characters, then NFC.
std::u32string ftfy_pass(const std::u32string& in, bool unescape) {
  std::u32string s = unescape ? html_unescape(in) : in;
  std::u32string t;
  for (size_t i = 0; i < s.size(); ++i) {
    char32_t c = s[i];
    if (c >= 0x80 && c <= 0x9F && c != 0x85) c = kCp1252[c - 0x80];
    switch (c) {
      case 0x132: t += U"IJ"; continue;
      case 0x133: t += U"ij"; continue;
      case 0x149: t += U"\u02bcn"; continue;
      case 0x1F1: t += U"DZ"; continue;
      case 0x1F2: t += U"Dz"; continue;
      case 0x1F3: t += U"dz"; continue;
      case 0x1C4: t += U"D\u017d"; continue;
      case 0x1C5: t += U"D\u017e"; continue;
      case 0x1C6: t += U"d\u017e"; continue;
      case 0x1C7: t += U"LJ"; continue;
      case 0x1C8: t += U"Lj"; continue;
      case 0x1C9: t += U"lj"; continue;
      case 0x1CA: t += U"NJ"; continue;
      case 0x1CB: t += U"Nj"; continue;
      case 0x1CC: t += U"nj"; continue;
      case 0xFB00: t += U"ff"; continue;
      case 0xFB01: t += U"fi"; continue;
      case 0xFB02: t += U"fl"; continue;
      case 0xFB03: t += U"ffi"; continue;
      case 0xFB04: t += U"ffl"; continue;
      case 0xFB05: t += U"\u017ft"; continue;
      case 0xFB06: t += U"st"; continue;
      case 0x3000: t += U' '; continue;
      default: break;
    }
    if (c >= 0xFF01 && c < 0xFFF0) {
      t += nfkc(std::u32string(1, c));
      continue;
    }
    if (c == 0x2BC || (c >= 0x2018 && c <= 0x201B)) c = U'\'';
    else if (c >= 0x201C && c <= 0x201F) c = U'"';
    else if (c == U'\r') {  // \r\n and \r -> \n
      if (i + 1 < s.size() && s[i + 1] == U'\n') ++i;
      c = U'\n';
    } else if (c == 0x2028 || c == 0x2029 || c == 0x85) c = U'\n';
    else if (c >= 0xD800 && c <= 0xDFFF) c = 0xFFFD;
    t.push_back(c);
  }
  std::u32string u;  // terminal escapes: ESC [ (digits | ;)* letter
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] == 0x1B && i + 1 < t.size() && t[i + 1] == U'[') {
      size_t k = i + 2;
      while (k < t.size() && ((t[k] >= U'0' && t[k] <= U'9') || t[k] == U';')) ++k;
      if (k < t.size() && t[k] < 128 && std::isalpha(int(t[k]))) {
        i = k;
        continue;
      }
    }
    const char32_t c = t[i];
    if (c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F ||
        (c >= 0x206A && c <= 0x206F) || c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC))
      continue;
    u.push_back(c);
  }
  return nfc(u);
}

// CLIP's bytes_to_unicode: printable bytes stand for themselves, the others for 256 + n.
// Returns the bytes in the table's order (the printable ones first), which is also the
// order of the first 256 vocabulary entries.
std::vector<int> build_byte_encoder(std::string (&enc)[256]) {
  std::vector<int> order;
  bool direct[256] = {};
  for (int b = '!'; b <= '~'; ++b) order.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) order.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) order.push_back(b);
  for (int b : order) direct[b] = true;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    enc[b].clear();
    utf8_append(enc[b], direct[b] ? char32_t(b) : char32_t(256 + n++));
    if (!direct[b]) order.push_back(b);
  }
  return order;
}

bool is_special_start(const std::u32string& s, size_t i, const std::u32string& tok) {
  return s.compare(i, tok.size(), tok) == 0;
}

}  // namespace

BpeTokenizer::BpeTokenizer(const std::string& merges_gz_path) {
  const std::string text = read_gzip(merges_gz_path);
  utf8_decode(text, "BPE vocabulary " + merges_gz_path);
  std::vector<std::pair<std::string, std::string>> merges;
  std::istringstream in(text);
  std::string line;
  std::getline(in, line);  // version header
  while (merges.size() < kMerges && std::getline(in, line)) {
    std::istringstream ls(line);
    std::string a, b, extra;
    MD_CHECK(ls >> a >> b && !(ls >> extra), "BPE vocabulary {}: line {} is not a merge pair",
             merges_gz_path, merges.size() + 2);
    merges.emplace_back(a, b);
  }
  MD_CHECK(merges.size() == kMerges, "BPE vocabulary {} has {} merges, expected {}",
           merges_gz_path, merges.size(), kMerges);
  const auto order = build_byte_encoder(byte_encoder_);
  for (int b : order) id_to_token_.push_back(byte_encoder_[b]);
  for (int b : order) id_to_token_.push_back(byte_encoder_[b] + "</w>");
  for (size_t r = 0; r < merges.size(); ++r) {
    id_to_token_.push_back(merges[r].first + merges[r].second);
    ranks_.emplace(merges[r].first + ' ' + merges[r].second, int64_t(r));
  }
  id_to_token_.push_back("<start_of_text>");
  id_to_token_.push_back("<end_of_text>");
  for (size_t i = 0; i < id_to_token_.size(); ++i) encoder_[id_to_token_[i]] = int64_t(i);
  sot_id = encoder_.at("<start_of_text>");
  eot_id = encoder_.at("<end_of_text>");
}

std::u32string BpeTokenizer::clean(std::string_view utf8) {
  std::u32string s = utf8_decode(utf8);
  // ftfy.fix_text: repeat until nothing changes; HTML only when the text has no '<'.
  const bool unescape = s.find(U'<') == std::u32string::npos;
  for (int i = 0; i < 8; ++i) {
    std::u32string t = ftfy_pass(s, unescape);
    if (t == s) break;
    s = std::move(t);
  }
  s = html_unescape(html_unescape(s));
  // whitespace_clean: " ".join(text.split()), then lower().
  std::u32string w;
  for (char32_t c : s) {
    if (is_py_space(c)) {
      if (!w.empty() && w.back() != U' ') w.push_back(U' ');
    } else {
      w.push_back(c);
    }
  }
  if (!w.empty() && w.back() == U' ') w.pop_back();
  return py_lower(w);
}

std::vector<std::string> BpeTokenizer::pre_tokenize(std::string_view utf8) const {
  // <start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
  static const std::u32string specials[] = {U"<start_of_text>", U"<end_of_text>"};
  static const std::u32string contractions[] = {U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};
  const std::u32string s = clean(utf8);
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t len = 0;
    for (const auto& t : specials)
      if (!len && is_special_start(s, i, t)) len = t.size();
    for (const auto& t : contractions)
      if (!len && is_special_start(s, i, t)) len = t.size();
    if (!len && is_letter(s[i])) {
      while (i + len < s.size() && is_letter(s[i + len])) ++len;
    } else if (!len && is_number(s[i])) {
      len = 1;
    } else if (!len && !is_py_space(s[i])) {
      while (i + len < s.size() && !is_py_space(s[i + len]) && !is_letter(s[i + len]) &&
             !is_number(s[i + len]))
        ++len;
    }
    if (!len) {  // whitespace
      ++i;
      continue;
    }
    out.push_back(utf8_encode(s.substr(i, len)));
    i += len;
  }
  return out;
}

std::vector<std::string> BpeTokenizer::bpe(const std::string& token) const {
  // Symbols: the byte stand-ins of the token, '</w>' glued to the last one.
  std::vector<std::string> word;
  for (unsigned char b : token) word.push_back(byte_encoder_[b]);
  if (word.empty()) return word;
  word.back() += "</w>";
  while (word.size() > 1) {
    int64_t best = INT64_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = ranks_.find(word[i] + ' ' + word[i + 1]);
      if (it != ranks_.end() && it->second < best) best = it->second, at = i;
    }
    if (best == INT64_MAX) break;
    const std::string first = word[at], second = word[at + 1];
    std::vector<std::string> merged;  // merge every occurrence, left to right
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
        merged.push_back(first + second);
        i += 2;
      } else {
        merged.push_back(word[i++]);
      }
    }
    word = std::move(merged);
  }
  return word;
}

std::vector<int64_t> BpeTokenizer::encode(std::string_view utf8) const {
  std::vector<int64_t> ids;
  for (const auto& tok : pre_tokenize(utf8)) {
    if (tok == "<start_of_text>" || tok == "<end_of_text>") {
      ids.push_back(encoder_.at(tok));
      continue;
    }
    auto it = cache_.find(tok);
    if (it == cache_.end()) {
      std::vector<int64_t> v;
      for (const auto& piece : bpe(tok)) v.push_back(encoder_.at(piece));
      if (cache_.size() > 100000) cache_.clear();
      it = cache_.emplace(tok, std::move(v)).first;
    }
    ids.insert(ids.end(), it->second.begin(), it->second.end());
  }
  return ids;
}

std::vector<int64_t> BpeTokenizer::encode_padded(std::string_view utf8, int64_t L) const {
  MD_CHECK(L >= 2, "context length must be >= 2 for the start and end tokens, got {}", L);
  std::vector<int64_t> ids{sot_id};
  auto body = encode(utf8);
  ids.insert(ids.end(), body.begin(), body.end());
  ids.push_back(eot_id);
  if (int64_t(ids.size()) > L) {
    ids.resize(size_t(L));
    ids.back() = eot_id;
  }
  ids.resize(size_t(L), 0);
  return ids;
}

}  // namespace microdit::text
