// Tokenizer parity: ids identical to Hugging Face tokenizers (MiniLM's WordPiece) and
// open_clip's SimpleTokenizer on the caption list in tests/data (made by
// tools/make_text_fixtures.py). Needs the vocabularies set-up exports; skips without them.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "text/bpe.h"
#include "text/encoder.h"
#include "text/unicode.h"
#include "text/wordpiece.h"

#include "test_util.h"

using namespace microdit;
using microdit::test_util::error_of;
using namespace microdit::text;

namespace {

nlohmann::json load_json(const std::string& name) {
  std::ifstream f(std::string(microdit::test_util::source_dir()) + "/tests/data/" + name);
  EXPECT_TRUE(f) << name;
  return nlohmann::json::parse(f);
}

std::string show(const std::vector<int64_t>& v) {
  std::string s;
  for (auto x : v) s += std::to_string(x) + " ";
  return s;
}

#define SKIP_WITHOUT(path)                                                                   \
  if (!is_regular_file(path))                                                                     \
  GTEST_SKIP() << "text assets missing: " << (path)                                          \
               << " (scripts/setup.sh exports them; needs the pinned Python packages)"

template <class Encode>
void expect_ids(const char* key, int64_t L, Encode encode) {
  const auto caps = load_json("text_captions.json");
  const auto ids = load_json("text_token_ids.json");
  ASSERT_GE(caps.size(), 200u);
  ASSERT_EQ(ids[key].size(), caps.size());
  int bad = 0;
  for (size_t i = 0; i < caps.size(); ++i) {
    const std::string c = caps[i].get<std::string>();
    auto want = ids[key][i].get<std::vector<int64_t>>();
    auto got = encode(c);
    if (L > 0) want.resize(size_t(L), 0);  // the fixture drops the trailing padding (id 0)
    if (got != want && ++bad <= 5)
      ADD_FAILURE() << key << " caption " << i << " '" << c << "'\n  want " << show(want)
                    << "\n  got  " << show(got);
  }
  EXPECT_EQ(bad, 0) << bad << " of " << caps.size() << " captions differ";
}

}  // namespace

TEST(Unicode, RejectsInvalidUtf8) {
  EXPECT_NE(error_of([] { utf8_decode("ab\xff"); }).find("not valid UTF-8 (byte 0xff at offset 2)"),
            std::string::npos);
  EXPECT_FALSE(error_of([] { utf8_decode("\xc0\xaf"); }).empty());      // overlong
  EXPECT_FALSE(error_of([] { utf8_decode("\xed\xa0\x80"); }).empty());  // surrogate
  EXPECT_FALSE(error_of([] { utf8_decode("\xe2\x82"); }).empty());      // truncated
  EXPECT_EQ(utf8_encode(utf8_decode("h\xc3\xa9llo \xf0\x9f\x90\xb1")), "h\xc3\xa9llo \xf0\x9f\x90\xb1");
  EXPECT_EQ(utf8_encode(py_lower(utf8_decode("\xce\x9f\xce\xa3"))), "\xce\xbf\xcf\x82");  // ΟΣ -> ος
}

TEST(WordPiece, MatchesHuggingFaceFullLength) {
  SKIP_WITHOUT(minilm_dir() + "/vocab.txt");
  WordPieceTokenizer tok(minilm_dir() + "/vocab.txt");
  expect_ids("minilm_full", 0, [&](const std::string& c) {
    auto v = tok.encode(c);
    v.insert(v.begin(), tok.cls_id);
    v.push_back(tok.sep_id);
    return v;
  });
}

TEST(WordPiece, MatchesHuggingFacePaddedTruncated) {
  SKIP_WITHOUT(minilm_dir() + "/vocab.txt");
  WordPieceTokenizer tok(minilm_dir() + "/vocab.txt");
  const int64_t L = load_json("text_token_ids.json")["length"];
  expect_ids("minilm", L, [&](const std::string& c) { return tok.encode_padded(c, L); });
}

TEST(WordPiece, BasicTokenizer) {
  SKIP_WITHOUT(minilm_dir() + "/vocab.txt");
  WordPieceTokenizer tok(minilm_dir() + "/vocab.txt");
  EXPECT_EQ(tok.basic_tokenize("Héllo, WORLD!  日本"),
            (std::vector<std::string>{"hello", ",", "world", "!", "\xe6\x97\xa5", "\xe6\x9c\xac"}));
  EXPECT_EQ(tok.tokenize("unaffable"), (std::vector<std::string>{"una", "##ffa", "##ble"}));
  EXPECT_EQ(tok.encode_padded("", 4), (std::vector<int64_t>{tok.cls_id, tok.sep_id, 0, 0}));
}

TEST(WordPiece, MissingVocabulary) {
  EXPECT_NE(error_of([] { WordPieceTokenizer("/nonexistent/vocab.txt"); })
                .find("WordPiece vocabulary file not found: /nonexistent/vocab.txt"),
            std::string::npos);
}

TEST(Bpe, MatchesOpenClipFullLength) {
  SKIP_WITHOUT(clip_bpe_path());
  BpeTokenizer tok(clip_bpe_path());
  expect_ids("clip_full", 0, [&](const std::string& c) {
    auto v = tok.encode(c);
    v.insert(v.begin(), tok.sot_id);
    v.push_back(tok.eot_id);
    return v;
  });
}

TEST(Bpe, MatchesOpenClipPaddedTruncated) {
  SKIP_WITHOUT(clip_bpe_path());
  BpeTokenizer tok(clip_bpe_path());
  const int64_t L = load_json("text_token_ids.json")["length"];
  expect_ids("clip", L, [&](const std::string& c) { return tok.encode_padded(c, L); });
}

TEST(Bpe, SpecialTokensAndTruncation) {
  SKIP_WITHOUT(clip_bpe_path());
  BpeTokenizer tok(clip_bpe_path());
  EXPECT_EQ(tok.sot_id, 49406);
  EXPECT_EQ(tok.eot_id, 49407);
  EXPECT_EQ(tok.vocab_size(), 49408);
  auto ids = tok.encode_padded(std::string(500, 'a') + " b c d e f g h", 8);
  EXPECT_EQ(ids.front(), 49406);
  EXPECT_EQ(ids.back(), 49407);
  EXPECT_EQ(tok.encode_padded("", 4), (std::vector<int64_t>{49406, 49407, 0, 0}));
}

TEST(Bpe, BadInput) {
  EXPECT_NE(error_of([] { BpeTokenizer("/nonexistent/bpe.txt.gz"); })
                .find("BPE vocabulary file not found: /nonexistent/bpe.txt.gz"),
            std::string::npos);
  const std::string plain = "/tmp/md_not_gzip_" + std::to_string(::getpid()) + ".txt.gz";
  std::ofstream(plain) << "#version\na b\nc d\n";  // read as plain text, too few merges
  EXPECT_NE(error_of([&] { BpeTokenizer t(plain); }).find("has 2 merges, expected 48894"),
            std::string::npos);
  ::unlink(plain.c_str());
  SKIP_WITHOUT(clip_bpe_path());
  BpeTokenizer tok(clip_bpe_path());
  EXPECT_NE(error_of([&] { tok.encode("bad \xc3\x28 utf8"); }).find("not valid UTF-8"),
            std::string::npos);
}
