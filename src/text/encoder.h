// Frozen text encoders behind one interface: texts -> token ids (B, L) -> hidden states
// (B, L, W) in float32. make_text_encoder() builds one from a name or a path:
//   minilm                       all-MiniLM-L6-v2 (BERT, 384 wide) from the text asset folder
//   DIR                          a BERT folder: config.json, vocab.txt, model.safetensors
//   clip-vit-h-14:random         the paper's tower shape (1024/24/16, 77 tokens), random weights
//   clip-vit-h-14:FILE           ... with weights from an open_clip or CLIPTextModel safetensors
//   clip-vit-h-14-quickgelu:...  the same with QuickGELU (OpenAI-style and DFN5B towers)
//   clip:FILE, FILE.safetensors  a CLIP text tower whose shape is read from the weights
//   clip-quickgelu:FILE          ... with QuickGELU
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <string>
#include <vector>

namespace microdit::text {

using at::Tensor;

class TextEncoder {
 public:
  virtual ~TextEncoder() = default;
  virtual std::string describe() const = 0;  // one line: kind, shape, source
  virtual int64_t length() const = 0;        // L
  virtual int64_t width() const = 0;         // W
  // (B, L) int64 on the CPU. Throws Error for text that is not UTF-8.
  virtual Tensor tokenize(const std::vector<std::string>& texts) const = 0;
  // (B, L) int64 -> (B, L, W) float32 on the CPU; no gradients.
  virtual Tensor encode_ids(const Tensor& ids) = 0;
  Tensor encode(const std::vector<std::string>& texts) { return encode_ids(tokenize(texts)); }
};

struct TextEncoderOptions {
  int64_t length = 0;          // tokens per text; 0: 77 (the paper's caption length)
  c10::Device device = c10::kCPU;
  int64_t clip_skip = 0;       // CLIP: leave out this many final blocks before ln_final
};

std::unique_ptr<TextEncoder> make_text_encoder(const std::string& spec,
                                               const TextEncoderOptions& options = {});

// Where set-up puts the assets: $MICRODIT_TEXT_DIR, else $XDG_CACHE_HOME/microdit/text, else
// ~/.cache/microdit/text.
std::string text_assets_dir();
std::string minilm_dir();       // text_assets_dir()/all-MiniLM-L6-v2
std::string clip_bpe_path();    // text_assets_dir()/bpe_simple_vocab_16e6.txt.gz

}  // namespace microdit::text
