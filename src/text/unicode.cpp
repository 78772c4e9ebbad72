#include "text/unicode.h"

#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include "core/error.h"

namespace microdit::text {

std::u32string utf8_decode(std::string_view s, std::string_view what) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  auto bad = [&](size_t i) {
    fail("{} is not valid UTF-8 (byte 0x{:02x} at offset {})", what, unsigned(p[i]), i);
  };
  for (size_t i = 0; i < n;) {
    const unsigned char b = p[i];
    if (b < 0x80) {
      out.push_back(b);
      ++i;
      continue;
    }
    int len = 0;
    char32_t c = 0, min = 0;
    if ((b & 0xE0) == 0xC0) len = 2, c = b & 0x1F, min = 0x80;
    else if ((b & 0xF0) == 0xE0) len = 3, c = b & 0x0F, min = 0x800;
    else if ((b & 0xF8) == 0xF0) len = 4, c = b & 0x07, min = 0x10000;
    else bad(i);
    if (i + len > n) bad(i);
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) bad(i + k);
      c = (c << 6) | (p[i + k] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) bad(i);
    out.push_back(c);
    i += len;
  }
  return out;
}

void utf8_append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(char(c));
  } else if (c < 0x800) {
    out.push_back(char(0xC0 | (c >> 6)));
    out.push_back(char(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(char(0xE0 | (c >> 12)));
    out.push_back(char(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(char(0x80 | (c & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (c >> 18)));
    out.push_back(char(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(char(0x80 | (c & 0x3F)));
  }
}

std::string utf8_encode(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) utf8_append(out, c);
  return out;
}

namespace {

enum class Form { NFD, NFC, NFKC };

std::u32string normalize(std::u32string_view s, Form form) {
  UErrorCode err = U_ZERO_ERROR;
  const icu::Normalizer2* norm = form == Form::NFD   ? icu::Normalizer2::getNFDInstance(err)
                                 : form == Form::NFC ? icu::Normalizer2::getNFCInstance(err)
                                                     : icu::Normalizer2::getNFKCInstance(err);
  MD_CHECK(U_SUCCESS(err), "ICU normaliser unavailable: {}", u_errorName(err));
  auto in = icu::UnicodeString::fromUTF32(reinterpret_cast<const UChar32*>(s.data()),
                                          int32_t(s.size()));
  icu::UnicodeString res = norm->normalize(in, err);
  MD_CHECK(U_SUCCESS(err), "ICU normalisation failed: {}", u_errorName(err));
  std::u32string out(size_t(res.countChar32()), U'\0');
  res.toUTF32(reinterpret_cast<UChar32*>(out.data()), int32_t(out.size()), err);
  return out;
}

uint32_t mask(char32_t c) { return U_MASK(u_charType(UChar32(c))); }

}  // namespace

std::u32string nfd(std::u32string_view s) { return normalize(s, Form::NFD); }
std::u32string nfc(std::u32string_view s) { return normalize(s, Form::NFC); }
std::u32string nfkc(std::u32string_view s) { return normalize(s, Form::NFKC); }

bool is_letter(char32_t c) { return mask(c) & U_GC_L_MASK; }
bool is_number(char32_t c) { return mask(c) & U_GC_N_MASK; }
bool is_nonspacing_mark(char32_t c) { return mask(c) & U_GC_MN_MASK; }
bool is_punctuation(char32_t c) { return mask(c) & U_GC_P_MASK; }
bool is_other(char32_t c) { return mask(c) & U_GC_C_MASK; }
bool is_white_space(char32_t c) { return u_isUWhiteSpace(UChar32(c)); }
bool is_py_space(char32_t c) {
  if (mask(c) & U_GC_ZS_MASK) return true;
  const auto d = u_charDirection(UChar32(c));
  return d == U_WHITE_SPACE_NEUTRAL || d == U_BLOCK_SEPARATOR || d == U_SEGMENT_SEPARATOR;
}
bool is_cased(char32_t c) { return u_hasBinaryProperty(UChar32(c), UCHAR_CASED); }
bool is_case_ignorable(char32_t c) { return u_hasBinaryProperty(UChar32(c), UCHAR_CASE_IGNORABLE); }
char32_t simple_lower(char32_t c) { return char32_t(u_tolower(UChar32(c))); }

std::u32string py_lower(std::u32string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const char32_t c = s[i];
    if (c == 0x130) {  // the one unconditional multi-character lower-case mapping
      out += U"i\u0307";
    } else if (c == 0x3A3) {  // final sigma: cased before, no cased after (skipping ignorables)
      size_t j = i;
      bool before = false, after = false;
      while (j > 0 && is_case_ignorable(s[j - 1])) --j;
      before = j > 0 && is_cased(s[j - 1]);
      j = i + 1;
      while (j < s.size() && is_case_ignorable(s[j])) ++j;
      after = j < s.size() && is_cased(s[j]);
      out.push_back(before && !after ? 0x3C2 : 0x3C3);
    } else {
      out.push_back(simple_lower(c));
    }
  }
  return out;
}

}  // namespace microdit::text
