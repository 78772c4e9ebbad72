// microdit dataset emoji: render every fully-qualified emoji into DIR/images/NNNNN.png with
// DIR/captions.jsonl (file, caption, name, group, subgroup, colour, split), DIR/dataset.json (size
// and counts) and DIR/preview.png (the first 256 images). See docs/dataset.md.
#include <fmt/format.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/progress.h"
#include "data/colour_words.h"
#include "data/emoji.h"
#include "data/image.h"
#include "io/atomic_file.h"

namespace microdit::cli {

namespace {

struct EmojiDatasetOptions {
  std::string out, emoji_test = kEmojiTestPath, font = kEmojiFontPath;
  int size = 32, limit = 0;
  bool plain_captions = false;  // no ", mostly <colour>" after the caption
  std::string skin_tones = "all";  // "all", or "none": drop the skin-tone variants
};

// A skin-tone modifier (U+1F3FB..U+1F3FF, Fitzpatrick types 1-2 to 6) anywhere in the sequence.
bool has_skin_tone(const EmojiEntry& e) {
  for (char32_t c : e.codepoints)
    if (c >= 0x1F3FB && c <= 0x1F3FF) return true;
  return false;
}

void make_dirs(const std::string& path) {
  for (size_t pos = 0; pos != std::string::npos;) {
    pos = path.find('/', pos + 1);
    const std::string dir = path.substr(0, pos);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
      fail("{}: cannot create directory ({})", dir, std::strerror(errno));
  }
  struct stat st;
  MD_CHECK(::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "{}: not a directory", path);
}


void run_emoji_dataset(const EmojiDatasetOptions& o) {
  MD_CHECK(!o.out.empty(), "--out is required");
  MD_CHECK(o.size >= 8 && o.size <= 1024, "--size must be in [8, 1024], got {}", o.size);
  MD_CHECK(o.limit >= 0, "--limit must be >= 0, got {}", o.limit);
  MD_CHECK(o.skin_tones == "all" || o.skin_tones == "none", "--skin-tones must be all or none, got '{}'",
           o.skin_tones);
  // Inputs first, so a missing package fails before anything is written.
  std::vector<EmojiEntry> entries = load_emoji_test(o.emoji_test);
  const EmojiRenderer renderer(o.font);
  if (o.limit > 0 && static_cast<size_t>(o.limit) < entries.size()) entries.resize(o.limit);
  const std::string out = o.out.size() > 1 && o.out.back() == '/' ? o.out.substr(0, o.out.size() - 1) : o.out;
  make_dirs(out + "/images");

  std::string jsonl;
  std::vector<Image> preview;
  std::vector<std::pair<std::string, std::string>> failures;  // name, why
  int train = 0, val = 0, skipped = 0;
  ProgressBar bar("rendering", static_cast<int64_t>(entries.size()), "img");
  for (size_t i = 0; i < entries.size(); ++i) {
    const EmojiEntry& e = entries[i];
    if (o.skin_tones == "none" && has_skin_tone(e)) {
      ++skipped;
      bar.update(static_cast<int64_t>(i + 1));
      continue;
    }
    const EmojiRender r = renderer.render(e.utf8(), o.size);
    if (r.ok()) {
      // Files are numbered by position in emoji-test.txt, so names stay stable.
      const std::string file = fmt::format("images/{:05}.png", i);
      write_png(out + "/" + file, r.image);
      const std::string split = emoji_split(e.name);
      (split == "val" ? val : train)++;
      const std::string colour = dominant_colour_word(r.image);
      const nlohmann::ordered_json j = {{"file", file},
                                        {"caption", emoji_caption(e, o.plain_captions ? "" : colour)},
                                        {"name", e.name},
                                        {"group", e.group},
                                        {"subgroup", e.subgroup},
                                        {"colour", colour},
                                        {"split", split},
                                        {"codepoints", e.codepoints_hex()}};
      jsonl += j.dump() + "\n";
      if (preview.size() < 256) preview.push_back(r.image);
    } else {
      failures.emplace_back(e.name, r.failure);
    }
    bar.update(static_cast<int64_t>(i + 1));
  }
  bar.finish();
  const int rendered = train + val;
  MD_CHECK(rendered > 0, "no emoji rendered from {} (first failure: {}: {})", o.font,
           failures.empty() ? "-" : failures[0].first, failures.empty() ? "-" : failures[0].second);
  write_file_atomic(out + "/captions.jsonl", jsonl);
  write_png(out + "/preview.png", make_grid(preview, 16, 2));
  const nlohmann::ordered_json meta = {{"dataset", "emoji"},
                               {"version", 2},
                               {"colour_words", !o.plain_captions},
                               {"skin_tones", o.skin_tones},
                               {"size", o.size},
                               {"images", rendered},
                               {"train", train},
                               {"val", val},
                               {"failed", failures.size()},
                               {"emoji_test", o.emoji_test},
                               {"font", o.font}};
  write_file_atomic(out + "/dataset.json", meta.dump(2) + "\n");

  fmt::print("rendered {} of {} emoji at {}x{} ({} train, {} held out for validation{}) in {:.1f} s\n",
             rendered, entries.size(), o.size, o.size, train, val,
             skipped ? fmt::format("; {} skin-tone variants left out", skipped) : "", bar.elapsed_seconds());
  if (!failures.empty()) {
    fmt::print("failed: {}", failures.size());
    for (size_t i = 0; i < std::min<size_t>(5, failures.size()); ++i)
      fmt::print("{} {} ({})", i ? ";" : ":", failures[i].first, failures[i].second);
    fmt::print("{}\n", failures.size() > 5 ? "; ..." : "");
  }
  fmt::print("images: {}/images/  captions: {}/captions.jsonl  preview: {}/preview.png\n", out,
             out, out);
}

}  // namespace

void register_dataset(CLI::App& app) {
  auto* dataset = app.add_subcommand("dataset", "build an embedded training dataset");
  dataset->require_subcommand(1);
  auto o = std::make_shared<EmojiDatasetOptions>();
  auto* emoji = dataset->add_subcommand(
      "emoji", "every fully-qualified emoji of Unicode's emoji-test.txt, rendered from Noto Color Emoji");
  emoji->add_option("--out", o->out, "output directory")->required();
  emoji->add_option("--size", o->size, "image side S in pixels")->capture_default_str();
  emoji->add_option("--limit", o->limit, "render only the first N emoji (0: all)")->capture_default_str();
  emoji->add_option("--emoji-test", o->emoji_test, "emoji-test.txt (Debian unicode-data)")
      ->capture_default_str();
  emoji->add_option("--font", o->font, "colour emoji font (Debian fonts-noto-color-emoji)")
      ->capture_default_str();
  emoji->add_flag("--plain-captions", o->plain_captions,
                  "captions without the dominant colour word (\", mostly red\")");
  emoji->add_option("--skin-tones", o->skin_tones,
                    "all, or none: leave out the 1,785 skin-tone variants (each emoji once, in its default yellow)")
      ->capture_default_str();
  emoji->callback([o] { run_emoji_dataset(*o); });
}

}  // namespace microdit::cli
