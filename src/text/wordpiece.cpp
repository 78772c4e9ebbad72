#include "text/wordpiece.h"

#include <fstream>

#include "core/error.h"
#include "text/unicode.h"

namespace microdit::text {

namespace {

bool is_cjk(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
         (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
         (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

bool is_bert_whitespace(char32_t c) {
  return c == U'\t' || c == U'\n' || c == U'\r' || is_white_space(c);
}

bool is_bert_punctuation(char32_t c) {
  return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
         (c >= 123 && c <= 126) || is_punctuation(c);
}

}  // namespace

WordPieceTokenizer::WordPieceTokenizer(const std::string& vocab_path, bool lower_case)
    : lower_case_(lower_case) {
  std::ifstream f(vocab_path, std::ios::binary);
  MD_CHECK(f, "WordPiece vocabulary file not found: {}", vocab_path);
  std::string line;
  while (std::getline(f, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    utf8_decode(line, "WordPiece vocabulary " + vocab_path);
    vocab_.emplace(line, int64_t(id_to_token_.size()));
    id_to_token_.push_back(line);
  }
  auto special = [&](const char* t) {
    auto it = vocab_.find(t);
    MD_CHECK(it != vocab_.end(), "WordPiece vocabulary {} has no {} token", vocab_path, t);
    return it->second;
  };
  cls_id = special("[CLS]");
  sep_id = special("[SEP]");
  pad_id = special("[PAD]");
  unk_id = special("[UNK]");
}

std::vector<std::string> WordPieceTokenizer::basic_tokenize(std::string_view utf8) const {
  // Normaliser: clean text, pad CJK characters, strip accents, lower-case.
  std::u32string s;
  for (char32_t c : utf8_decode(utf8)) {
    if (c == 0 || c == 0xFFFD || (c != U'\t' && c != U'\n' && c != U'\r' && is_other(c)))
      continue;
    if (is_bert_whitespace(c)) {
      s.push_back(U' ');
    } else if (is_cjk(c)) {
      s += U' ';
      s.push_back(c);
      s += U' ';
    } else {
      s.push_back(c);
    }
  }
  if (lower_case_) {
    std::u32string d = nfd(s);
    s.clear();
    for (char32_t c : d)
      if (!is_nonspacing_mark(c)) s.push_back(simple_lower(c));
  }
  // Pre-tokeniser: split on whitespace (dropped) and punctuation (kept, one per token).
  std::vector<std::string> words;
  std::string cur;
  auto flush = [&] {
    if (!cur.empty()) words.push_back(std::move(cur));
    cur.clear();
  };
  for (char32_t c : s) {
    if (is_bert_whitespace(c)) {
      flush();
    } else if (is_bert_punctuation(c)) {
      flush();
      utf8_append(cur, c);
      flush();
    } else {
      utf8_append(cur, c);
    }
  }
  flush();
  return words;
}

void WordPieceTokenizer::word_pieces(const std::string& word, size_t chars,
                                     std::vector<int64_t>& ids) const {
  if (chars > size_t(max_input_chars_per_word)) {
    ids.push_back(unk_id);
    return;
  }
  std::vector<int64_t> pieces;
  size_t start = 0;
  while (start < word.size()) {
    size_t end = word.size();
    int64_t found = -1;
    while (end > start) {
      // Only cut at code-point boundaries.
      if (end < word.size() && (static_cast<unsigned char>(word[end]) & 0xC0) == 0x80) {
        --end;
        continue;
      }
      std::string sub = (start > 0 ? "##" : "") + word.substr(start, end - start);
      if (auto it = vocab_.find(sub); it != vocab_.end()) {
        found = it->second;
        break;
      }
      --end;
    }
    if (found < 0) {
      ids.push_back(unk_id);
      return;
    }
    pieces.push_back(found);
    start = end;
  }
  ids.insert(ids.end(), pieces.begin(), pieces.end());
}

std::vector<int64_t> WordPieceTokenizer::encode(std::string_view utf8) const {
  std::vector<int64_t> ids;
  for (const auto& w : basic_tokenize(utf8)) {
    size_t chars = 0;
    for (unsigned char b : w) chars += (b & 0xC0) != 0x80;
    word_pieces(w, chars, ids);
  }
  return ids;
}

std::vector<std::string> WordPieceTokenizer::tokenize(std::string_view utf8) const {
  std::vector<std::string> out;
  for (int64_t id : encode(utf8)) out.push_back(id_to_token_[size_t(id)]);
  return out;
}

std::vector<int64_t> WordPieceTokenizer::encode_padded(std::string_view utf8, int64_t L) const {
  MD_CHECK(L >= 2, "text length L must be >= 2 for [CLS] and [SEP], got {}", L);
  std::vector<int64_t> ids = encode(utf8);
  if (int64_t(ids.size()) > L - 2) ids.resize(size_t(L - 2));
  std::vector<int64_t> out;
  out.reserve(size_t(L));
  out.push_back(cls_id);
  out.insert(out.end(), ids.begin(), ids.end());
  out.push_back(sep_id);
  out.resize(size_t(L), pad_id);
  return out;
}

}  // namespace microdit::text
