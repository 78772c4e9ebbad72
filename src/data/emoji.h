// The embedded emoji dataset: Unicode's emoji-test.txt (Debian unicode-data) for the list,
// names, groups and subgroups; Noto Color Emoji (Debian fonts-noto-color-emoji) rendered
// with HarfBuzz shaping and FreeType, so each sequence (ZWJ, flag, keycap, skin tone) is
// one glyph; composited on white and resized to S x S.
#pragma once
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "data/image.h"

namespace microdit {

inline constexpr const char* kEmojiTestPath = "/usr/share/unicode/emoji/emoji-test.txt";
inline constexpr const char* kEmojiFontPath = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf";

struct EmojiEntry {
  std::vector<char32_t> codepoints;
  std::string name;      // "red heart", "flag: Germany", "thumbs up: medium skin tone"
  std::string version;   // "E0.6"
  std::string group;     // "Smileys & Emotion"
  std::string subgroup;  // "emotion"
  std::string utf8() const;
  std::string codepoints_hex() const;  // "2764 FE0F"
};

// Only `fully-qualified` lines are kept (components, minimally-qualified and unqualified
// forms are skipped), in file order. `source` names the input in error messages.
std::vector<EmojiEntry> parse_emoji_test(std::istream& in, const std::string& source = "emoji-test.txt");
// Reads the file; a missing file is an Error naming it and the Debian package unicode-data.
std::vector<EmojiEntry> load_emoji_test(const std::string& path = kEmojiTestPath);

// "red heart, smileys & emotion, heart": the name, the group in lower case and the subgroup
// with hyphens as spaces; with a colour word (data/colour_words.h), ", mostly <colour>" after.
std::string emoji_caption(const EmojiEntry& e, const std::string& colour = "");

// Deterministic held-out split: "val" for about 1 in 20 names (FNV-1a 64 of the name),
// "train" otherwise. Depends only on the name, so it is stable across font and file versions.
std::string emoji_split(const std::string& name);
// Hearts of a single clear hue: the prompts of the colour-conditioning check. Never held out.
const std::vector<std::string>& colour_probes();
bool is_colour_probe(const std::string& name);

// One line of a dataset's DIR/captions.jsonl, as `dataset emoji` writes it.
struct EmojiRow {
  std::string file, caption, name, subgroup, split;  // split: "train" when absent
};
// DIR/captions.jsonl. A missing file, a line without file and caption (and subgroup, when
// required), or no line at all is an Error naming the file and line.
std::vector<EmojiRow> read_emoji_rows(const std::string& dir, bool require_subgroup = true);

struct EmojiRender {
  Image image;          // size x size, on white; empty on failure
  std::string failure;  // why it did not render; empty on success
  int glyphs = 0;       // glyphs HarfBuzz produced for the sequence
  bool ok() const { return failure.empty(); }
};

class EmojiRenderer {
 public:
  // Opens the colour font at its fixed bitmap strike. A missing file is an Error naming it
  // and the Debian package fonts-noto-color-emoji.
  explicit EmojiRenderer(const std::string& font_path = kEmojiFontPath);
  ~EmojiRenderer();
  EmojiRenderer(const EmojiRenderer&) = delete;
  EmojiRenderer& operator=(const EmojiRenderer&) = delete;

  // The sequence shaped to one colour glyph, at the strike's size (premultiplied RGBA).
  // A sequence shaping into several glyphs, or to a glyph the font lacks, is a failure.
  EmojiRender render(const std::string& utf8, int size) const;
  RgbaImage render_rgba(const std::string& utf8, std::string* failure, int* glyphs = nullptr) const;
  int strike_pixels() const;  // the font's bitmap size (109 for Noto Color Emoji)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace microdit
