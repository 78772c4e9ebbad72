// BERT's tokenizer as Hugging Face `tokenizers` runs it for an uncased BERT (BertNormalizer,
// BertPreTokenizer, WordPiece): clean-up of control characters, spaces around CJK characters,
// accent stripping (NFD, drop Mn), lower-casing, whitespace and punctuation splitting, then
// greedy longest-match word pieces with the "##" continuation prefix.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace microdit::text {

class WordPieceTokenizer {
 public:
  // vocab.txt: one token per line, the id is the line number. Throws Error if missing or
  // lacking [CLS]/[SEP]/[PAD]/[UNK].
  explicit WordPieceTokenizer(const std::string& vocab_path, bool lower_case = true);

  std::vector<std::string> basic_tokenize(std::string_view utf8) const;  // words
  std::vector<std::string> tokenize(std::string_view utf8) const;        // word pieces
  std::vector<int64_t> encode(std::string_view utf8) const;  // ids, no special tokens
  // [CLS] ids [SEP] truncated to length L (the last L-2 ids dropped), then [PAD] up to L.
  std::vector<int64_t> encode_padded(std::string_view utf8, int64_t L) const;

  int64_t vocab_size() const { return int64_t(vocab_.size()); }
  int64_t cls_id, sep_id, pad_id, unk_id;
  int max_input_chars_per_word = 100;

 private:
  void word_pieces(const std::string& word, size_t chars, std::vector<int64_t>& ids) const;
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  bool lower_case_;
};

}  // namespace microdit::text
