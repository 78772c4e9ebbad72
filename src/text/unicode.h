// UTF-8 and the few Unicode properties the tokenizers need, on ICU (normalisation, general
// categories, case mapping). Code points are char32_t; strings in and out are UTF-8.
#pragma once
#include <string>
#include <string_view>

namespace microdit::text {

// Strict UTF-8 decoding (no overlongs, surrogates or values past U+10FFFF). Throws
// microdit::Error "<what> is not valid UTF-8 (byte 0xNN at offset K)".
std::u32string utf8_decode(std::string_view s, std::string_view what = "text");
std::string utf8_encode(std::u32string_view s);
void utf8_append(std::string& out, char32_t c);

std::u32string nfd(std::u32string_view s);
std::u32string nfc(std::u32string_view s);
std::u32string nfkc(std::u32string_view s);

bool is_letter(char32_t c);       // L*
bool is_number(char32_t c);       // N*
bool is_nonspacing_mark(char32_t c);  // Mn
bool is_punctuation(char32_t c);  // P*
bool is_other(char32_t c);        // Cc, Cf, Cs, Co, Cn
bool is_white_space(char32_t c);  // the White_Space property (Rust's char::is_whitespace)
bool is_py_space(char32_t c);     // Python's str.isspace: Zs, or bidi class WS, B or S
bool is_cased(char32_t c);
bool is_case_ignorable(char32_t c);
char32_t simple_lower(char32_t c);  // one-to-one lower-case mapping

// Python's str.lower(): full mappings (U+0130 -> i + U+0307) and the final-sigma rule.
std::u32string py_lower(std::u32string_view s);

}  // namespace microdit::text
