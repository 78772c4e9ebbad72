#include "data/emoji.h"

#include <ft2build.h>
#include FT_FREETYPE_H
#include <hb-ft.h>
#include <hb.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <istream>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"

namespace microdit {

// ---- emoji-test.txt -------------------------------------------------------------------

namespace {

std::string trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t\r");
  if (b == std::string_view::npos) return "";
  return std::string(s.substr(b, s.find_last_not_of(" \t\r") - b + 1));
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool is_version_tag(const std::string& w) {
  // "E0.6", "E13.1", "E15.0"
  const auto dot = w.find('.');
  if (w.size() < 4 || w[0] != 'E' || dot == std::string::npos || dot < 2 || dot + 1 == w.size())
    return false;
  return std::all_of(w.begin() + 1, w.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)) || c == '.'; });
}

}  // namespace

std::string EmojiEntry::utf8() const {
  std::string s;
  for (char32_t cp : codepoints) append_utf8(s, cp);
  return s;
}

std::string EmojiEntry::codepoints_hex() const {
  std::string s;
  for (char32_t cp : codepoints) s += fmt::format("{}{:04X}", s.empty() ? "" : " ", static_cast<uint32_t>(cp));
  return s;
}

std::vector<EmojiEntry> parse_emoji_test(std::istream& in, const std::string& source) {
  std::vector<EmojiEntry> out;
  std::string group, subgroup, raw;
  for (int lineno = 1; std::getline(in, raw); ++lineno) {
    const std::string line = trim(raw);
    if (line.empty()) continue;
    if (line[0] == '#') {
      if (line.rfind("# group:", 0) == 0) group = trim(line.substr(8)), subgroup.clear();
      else if (line.rfind("# subgroup:", 0) == 0) subgroup = trim(line.substr(11));
      continue;
    }
    // "1F600 ; fully-qualified # 😀 E1.0 grinning face" (the emoji itself may hold a '#').
    const auto semi = line.find(';');
    const auto hash = semi == std::string::npos ? semi : line.find('#', semi);
    MD_CHECK(hash != std::string::npos, "{}:{}: expected 'code points ; status # emoji name'",
             source, lineno);
    if (trim(std::string_view(line).substr(semi + 1, hash - semi - 1)) != "fully-qualified") continue;
    EmojiEntry e;
    std::istringstream cps(line.substr(0, semi));
    for (std::string w; cps >> w;) {
      size_t used = 0;
      unsigned long v = 0;
      try {
        v = std::stoul(w, &used, 16);
      } catch (const std::exception&) {
        used = 0;
      }
      MD_CHECK(used == w.size() && v <= 0x10FFFF, "{}:{}: bad code point '{}'", source, lineno, w);
      e.codepoints.push_back(static_cast<char32_t>(v));
    }
    MD_CHECK(!e.codepoints.empty(), "{}:{}: no code points", source, lineno);
    // After '#': the emoji, the version tag, then the name.
    std::istringstream rest(line.substr(hash + 1));
    std::string word;
    while (rest >> word && !is_version_tag(word)) {
    }
    MD_CHECK(is_version_tag(word), "{}:{}: no version tag (like E0.6) before the name", source, lineno);
    e.version = word;
    std::getline(rest, e.name);
    e.name = trim(e.name);
    MD_CHECK(!e.name.empty(), "{}:{}: emoji without a name", source, lineno);
    e.group = group;
    e.subgroup = subgroup;
    out.push_back(std::move(e));
  }
  MD_CHECK(!out.empty(), "{}: no fully-qualified emoji found (is this Unicode's emoji-test.txt?)", source);
  return out;
}

std::vector<EmojiEntry> load_emoji_test(const std::string& path) {
  MD_CHECK(is_regular_file(path), "{}: no such file (install the Debian package unicode-data)", path);
  std::ifstream in(path);
  MD_CHECK(in.good(), "{}: cannot open for reading", path);
  return parse_emoji_test(in, path);
}

std::string emoji_caption(const EmojiEntry& e, const std::string& colour) {
  std::string group = e.group, subgroup = e.subgroup;
  for (char& c : group) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::replace(subgroup.begin(), subgroup.end(), '-', ' ');
  std::string caption = e.name;
  if (!group.empty()) caption += ", " + group;
  if (!subgroup.empty()) caption += ", " + subgroup;
  if (!colour.empty()) caption += ", mostly " + colour;
  return caption;
}

const std::vector<std::string>& colour_probes() {
  static const std::vector<std::string> probes = {"red heart",    "orange heart", "yellow heart",
                                                  "green heart",  "blue heart",   "purple heart",
                                                  "brown heart",  "pink heart",   "light blue heart"};
  return probes;
}

bool is_colour_probe(const std::string& name) {
  for (const auto& p : colour_probes())
    if (p == name) return true;
  return false;
}

std::string emoji_split(const std::string& name) {
  // The colour probes (docs/dataset.md) are the prompts of the conditioning check: always train.
  if (is_colour_probe(name)) return "train";
  uint64_t h = 14695981039346656037ull;  // FNV-1a 64
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return h % 20 == 0 ? "val" : "train";
}

// ---- rendering ------------------------------------------------------------------------

struct EmojiRenderer::Impl {
  FT_Library lib = nullptr;
  FT_Face face = nullptr;
  hb_font_t* font = nullptr;
  int strike = 0;
  ~Impl() {
    if (font) hb_font_destroy(font);  // drops HarfBuzz's reference to the face
    if (face) FT_Done_Face(face);
    if (lib) FT_Done_FreeType(lib);
  }
};

EmojiRenderer::EmojiRenderer(const std::string& font_path) : impl_(std::make_unique<Impl>()) {
  MD_CHECK(is_regular_file(font_path),
           "{}: no such file (install the Debian package fonts-noto-color-emoji)", font_path);
  MD_CHECK(FT_Init_FreeType(&impl_->lib) == 0, "FreeType failed to initialise");
  const FT_Error err = FT_New_Face(impl_->lib, font_path.c_str(), 0, &impl_->face);
  if (err) {
    impl_->face = nullptr;
    fail("{}: not a font FreeType can open (FreeType error {})", font_path, err);
  }
  FT_Face f = impl_->face;
  if (f->num_fixed_sizes > 0) {  // a bitmap font (CBDT): pick its largest strike
    int best = 0;
    for (int i = 1; i < f->num_fixed_sizes; ++i)
      if (f->available_sizes[i].y_ppem > f->available_sizes[best].y_ppem) best = i;
    MD_CHECK(FT_Select_Size(f, best) == 0, "{}: cannot select bitmap strike {}", font_path, best);
    impl_->strike = static_cast<int>(f->available_sizes[best].y_ppem >> 6);
  } else {  // a scalable colour font
    impl_->strike = 128;
    MD_CHECK(FT_Set_Pixel_Sizes(f, 0, impl_->strike) == 0, "{}: cannot set pixel size", font_path);
  }
  impl_->font = hb_ft_font_create_referenced(f);
  MD_CHECK(impl_->font != nullptr, "{}: HarfBuzz cannot use this font", font_path);
}

EmojiRenderer::~EmojiRenderer() = default;

int EmojiRenderer::strike_pixels() const { return impl_->strike; }

RgbaImage EmojiRenderer::render_rgba(const std::string& utf8, std::string* failure, int* glyphs) const {
  hb_buffer_t* buf = hb_buffer_create();
  hb_buffer_add_utf8(buf, utf8.c_str(), static_cast<int>(utf8.size()), 0, -1);
  hb_buffer_guess_segment_properties(buf);
  // Variation selectors and joiners that did not become part of a ligature vanish.
  hb_buffer_set_flags(buf, HB_BUFFER_FLAG_REMOVE_DEFAULT_IGNORABLES);
  hb_shape(impl_->font, buf, nullptr, 0);
  unsigned n = 0;
  const hb_glyph_info_t* info = hb_buffer_get_glyph_infos(buf, &n);
  std::vector<unsigned> ids;
  for (unsigned i = 0; i < n; ++i) ids.push_back(info[i].codepoint);
  hb_buffer_destroy(buf);
  if (glyphs) *glyphs = static_cast<int>(n);

  RgbaImage out;
  out.premultiplied = true;
  auto fail_with = [&](std::string why) {
    if (failure) *failure = std::move(why);
    return RgbaImage{};
  };
  if (n == 0) return fail_with("shaped to no glyph");
  if (std::count(ids.begin(), ids.end(), 0u)) return fail_with("the font has no glyph for it");
  if (n > 1) return fail_with(fmt::format("shaped into {} glyphs, not one", n));

  FT_Face f = impl_->face;
  if (FT_Load_Glyph(f, ids[0], FT_LOAD_COLOR) != 0) return fail_with("FreeType cannot load the glyph");
  if (f->glyph->format != FT_GLYPH_FORMAT_BITMAP && FT_Render_Glyph(f->glyph, FT_RENDER_MODE_NORMAL) != 0)
    return fail_with("FreeType cannot render the glyph");
  const FT_Bitmap& bm = f->glyph->bitmap;
  if (bm.width == 0 || bm.rows == 0) return fail_with("empty glyph bitmap");
  if (bm.pixel_mode != FT_PIXEL_MODE_BGRA && bm.pixel_mode != FT_PIXEL_MODE_GRAY)
    return fail_with(fmt::format("unsupported bitmap pixel mode {}", static_cast<int>(bm.pixel_mode)));
  out.width = static_cast<int>(bm.width);
  out.height = static_cast<int>(bm.rows);
  out.pixels.resize(static_cast<size_t>(out.width) * out.height * 4);
  const unsigned stride = static_cast<unsigned>(std::abs(bm.pitch));
  for (unsigned r = 0; r < bm.rows; ++r) {
    const unsigned char* row = bm.buffer + static_cast<size_t>(bm.pitch >= 0 ? r : bm.rows - 1 - r) * stride;
    uint8_t* dst = &out.pixels[static_cast<size_t>(r) * out.width * 4];
    for (unsigned c = 0; c < bm.width; ++c, dst += 4) {
      if (bm.pixel_mode == FT_PIXEL_MODE_BGRA) {  // premultiplied BGRA
        dst[0] = row[c * 4 + 2], dst[1] = row[c * 4 + 1], dst[2] = row[c * 4], dst[3] = row[c * 4 + 3];
      } else {  // coverage only: black ink
        dst[0] = dst[1] = dst[2] = 0, dst[3] = row[c];
      }
    }
  }
  return out;
}

EmojiRender EmojiRenderer::render(const std::string& utf8, int size) const {
  MD_CHECK(size >= 1 && size <= 4096, "emoji image size must be in [1, 4096], got {}", size);
  EmojiRender r;
  const RgbaImage rgba = render_rgba(utf8, &r.failure, &r.glyphs);
  if (!r.ok()) return r;
  const Image on_white = composite_on_white(rgba);
  const Image square = pad_to_square(on_white, std::max(on_white.width, on_white.height));
  r.image = resize(square, size, size);
  return r;
}

std::vector<EmojiRow> read_emoji_rows(const std::string& dir, bool require_subgroup) {
  const std::string path = dir + "/captions.jsonl";
  MD_CHECK(is_regular_file(path), "{}: no such file (make a dataset with `microdit dataset emoji`)", path);
  std::ifstream in(path);
  std::vector<EmojiRow> rows;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    MD_CHECK(!j.is_discarded() && j.is_object() && j.contains("file") && j.contains("caption") &&
                 (!require_subgroup || j.contains("subgroup")),
             "{}:{}: expected a JSON object with file, caption{}", path, n,
             require_subgroup ? " and subgroup (an emoji dataset)" : "");
    rows.push_back({j["file"].get<std::string>(), j["caption"].get<std::string>(),
                    j.value("name", std::string()), j.value("subgroup", std::string()),
                    j.value("split", std::string("train"))});
  }
  MD_CHECK(!rows.empty(), "{}: no captions", path);
  return rows;
}

}  // namespace microdit
