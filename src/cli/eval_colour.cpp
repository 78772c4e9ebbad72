// microdit eval-colour --ckpt FILE: does the text steer the picture? Samples prompts that
// differ only in a colour word and checks each sample's dominant hue against its prompt;
// with --metrics, also that the validation loss fell clearly below its starting value.
#include <nlohmann/json.hpp>

#include <fstream>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/precision.h"
#include "core/progress.h"
#include "eval/colour.h"
#include "eval/sampling.h"
#include "eval/summary.h"
#include "text/encoder.h"

namespace microdit::cli {

namespace {

struct EvalOptions {
  RuntimeOptions rt;
  std::string ckpt, metrics, out, summary, precision = "auto";
  int n = 8, steps = 20;
  // Guidance: the sampler's default (microdit sample --cfg 4).
  double cfg = 4.0, min_accuracy = 0.8, max_val_ratio = 0.8;
  uint64_t seed = 1000;
  bool plain_captions = false;
};

void check_validation(const std::string& path, double max_ratio) {
  std::ifstream in(path);
  MD_CHECK(in.good(), "{}: cannot open the metrics file", path);
  double first = NAN, last = NAN;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("val_loss")) continue;
    const double v = j["val_loss"].get<double>();
    if (std::isnan(first)) first = v;
    last = v;
  }
  MD_CHECK(!std::isnan(first), "{}: no validation loss recorded", path);
  fmt::print("validation loss: {:.4f} at the start, {:.4f} at the end ({:.2f}x)\n", first, last,
             last / first);
  MD_CHECK(last <= max_ratio * first, "validation loss fell only to {:.2f}x its start (need <= {:.2f}x)",
           last / first, max_ratio);
}

void run(const EvalOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  const bool bf16 = sampling_bf16(o.precision, device.is_cuda());
  auto sm = load_sampling_model(o.ckpt, device);
  const auto& probes = heart_probes();
  std::vector<std::string> rows;
  for (const auto& p : probes)
    for (int i = 0; i < o.n; ++i) rows.push_back(p.prompt(!o.plain_captions));
  auto enc = text::make_text_encoder(sm.text_encoder, {sm.caption_len, c10::kCPU});
  auto emb = enc->encode(rows);
  SamplerOptions so;
  so.steps = o.steps;
  so.cfg = o.cfg;
  so.bf16 = bf16;
  fmt::print("sampling {} images: {} steps, guidance {}, {}\n", rows.size(), o.steps, o.cfg,
             sampling_precision_text(bf16, device.is_cuda()));
  ProgressBar bar("eval-colour", static_cast<int64_t>(rows.size()), "img");
  // Sample j of every prompt shares its noise (seed + j): only the colour word differs.
  std::vector<Tensor> per_prompt;
  for (size_t p = 0; p < probes.size(); ++p) {
    // `done` counts this prompt's images so far (CPU workers report a chunk each).
    const int64_t before = static_cast<int64_t>(p) * o.n;
    per_prompt.push_back(generate_images(*sm.model, emb.narrow(0, before, o.n), o.seed, sm.edm, so,
                                         o.n, [&bar, before](int64_t done) { bar.update(before + done); }));
  }
  bar.finish();
  int correct = 0, total = 0;
  std::vector<Image> cells;
  for (size_t p = 0; p < probes.size(); ++p) {
    int ok = 0;
    std::string seen;
    for (int i = 0; i < o.n; ++i) {
      Image im = tensor_to_image(per_prompt[p][i]);
      const auto hue = dominant_hue(im);
      const int k = nearest_probe(hue, probes);
      ok += k == static_cast<int>(p);
      seen += hue ? fmt::format(" {:.0f}", *hue) : " -";
      cells.push_back(resize(im, im.width * 3, im.height * 3));
    }
    fmt::print("  {:<8} {}/{} (reference hue {:.0f}; sample hues{})\n", probes[p].colour, ok, o.n, probes[p].hue, seen);
    correct += ok;
    total += o.n;
  }
  if (!o.out.empty()) {
    write_png(o.out, make_grid(cells, o.n));
    fmt::print("grid: {} (one row per colour)\n", o.out);
  }
  const double acc = static_cast<double>(correct) / total;
  fmt::print("colour accuracy: {}/{} = {:.0f}% (need {:.0f}%)\n", correct, total, 100 * acc,
             100 * o.min_accuracy);
  if (!o.summary.empty()) {
    update_summary(o.summary, "colour", {{"checkpoint", o.ckpt}, {"steps", o.steps}, {"cfg", o.cfg},
                                         {"precision", bf16 ? "bf16" : "fp32"}, {"correct", correct}, {"total", total}, {"accuracy", acc}});
    fmt::print("summary: {} (key \"colour\")\n", o.summary);
  }
  if (!o.metrics.empty()) check_validation(o.metrics, o.max_val_ratio);
  MD_CHECK(acc >= o.min_accuracy, "colour accuracy {:.0f}% is below {:.0f}%: the text does not steer the colour",
           100 * acc, 100 * o.min_accuracy);
}

}  // namespace

void register_eval_colour(CLI::App& app) {
  auto o = std::make_shared<EvalOptions>();
  auto* cmd = app.add_subcommand("eval-colour", "check that colour words steer the samples (hearts)");
  cmd->add_option("--ckpt", o->ckpt, "training checkpoint")->required();
  cmd->add_option("--n", o->n, "samples per colour")->capture_default_str();
  cmd->add_option("--steps", o->steps, "sampler steps")->capture_default_str();
  cmd->add_option("--cfg", o->cfg, "guidance scale")->capture_default_str();
  cmd->add_option("--seed", o->seed, "noise seed")->capture_default_str();
  cmd->add_option("--min-accuracy", o->min_accuracy, "fail below this fraction")->capture_default_str();
  cmd->add_option("--metrics", o->metrics, "metrics.jsonl: also require the validation loss to fall");
  cmd->add_option("--max-val-ratio", o->max_val_ratio, "final / first validation loss must be <= this")
      ->capture_default_str();
  cmd->add_option("--out", o->out, "write the samples as a grid PNG");
  cmd->add_option("--summary", o->summary, "JSON file to record the result in (key \"colour\")");
  cmd->add_flag("--plain-captions", o->plain_captions,
                "prompts without the colour word suffix (for data made with dataset emoji --plain-captions)");
  add_precision_option(*cmd, o->precision);
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
