// OpenCLIP's SimpleTokenizer: text clean-up (a subset of ftfy.fix_text, HTML unescaping twice,
// whitespace collapsing, lower-casing), the CLIP pre-tokenising pattern, byte-level BPE over
// bpe_simple_vocab_16e6.txt.gz, <start_of_text> ... <end_of_text>, zero padding, truncation
// that keeps the end token.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace microdit::text {

class BpeTokenizer {
 public:
  // The gzip'd merges file open_clip ships (49152 - 256 - 2 merges are used). Throws Error
  // when the file is missing or not a merges list.
  explicit BpeTokenizer(const std::string& merges_gz_path);

  // ftfy subset + html.unescape x2 + whitespace clean + lower, as open_clip's _clean_lower.
  static std::u32string clean(std::string_view utf8);
  std::vector<std::string> pre_tokenize(std::string_view utf8) const;  // after clean()
  std::vector<int64_t> encode(std::string_view utf8) const;  // no start/end tokens
  // [sot] ids [eot], cut to L with the last kept id replaced by eot, padded with 0 to L.
  std::vector<int64_t> encode_padded(std::string_view utf8, int64_t L) const;

  int64_t vocab_size() const { return int64_t(id_to_token_.size()); }
  int64_t sot_id = 0, eot_id = 0;

 private:
  std::vector<std::string> bpe(const std::string& token) const;  // byte-encoded token -> pieces
  std::unordered_map<std::string, int64_t> encoder_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::string, int64_t> ranks_;  // "first second" -> merge rank
  std::string byte_encoder_[256];                   // byte -> UTF-8 of its stand-in character
  // Word -> ids memo (as open_clip's cache): encode() is therefore not safe to call from
  // several threads on one tokenizer at once.
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

}  // namespace microdit::text
