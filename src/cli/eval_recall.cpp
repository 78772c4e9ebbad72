// microdit eval-recall --ckpt FILE --dataset DIR: does the model draw the emoji its caption
// names? One sample per fixed caption (Heun, guidance), then the nearest training image in
// pixel space: the captioned emoji itself in top-1 / top-5, or at least its subgroup
// (eval/recall.h). Prints the figures, writes them as JSON and a picture.
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/precision.h"
#include "core/progress.h"
#include "data/image.h"
#include "eval/recall.h"
#include "eval/sampling.h"
#include "eval/sampling_limits.h"
#include "eval/summary.h"
#include "text/encoder.h"

namespace microdit::cli {

namespace {

struct RecallOptions {
  RuntimeOptions rt;
  std::string ckpt, dataset, out, summary, precision = "auto";
  int n = 64, n_heldout = 64, steps = 30, batch = 32;
  double cfg = 4.0, min_top5 = 0, min_subgroup = 0;
  uint64_t seed = 0;
};

// (N, 3, H, W) in [-1, 1]: the images of `rows` at the given indices.
Tensor load_images(const std::string& dir, const std::vector<EmojiRow>& rows, const std::vector<int>& idx) {
  std::vector<Tensor> t;
  t.reserve(idx.size());
  for (int i : idx) t.push_back(image_to_tensor(read_png(dir + "/" + rows[i].file)));
  return at::stack(t);
}

nlohmann::ordered_json score_json(const RecallScore& s, bool own_image) {
  nlohmann::ordered_json j = {{"captions", s.n}};
  if (own_image) {
    j["top1"] = s.pct(s.top1) / 100;
    j["top5"] = s.pct(s.top5) / 100;
  }
  j["subgroup"] = s.pct(s.subgroup) / 100;
  return j;
}

void run(const RecallOptions& o) {
  MD_CHECK(o.n >= 1 && o.n_heldout >= 0 && o.batch >= 1, "--n and --batch must be >= 1, --n-heldout >= 0");
  check_sampling_values(1, o.steps, o.cfg, o.seed);  // eval/sampling_limits.h
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  const bool bf16 = sampling_bf16(o.precision, device.is_cuda());
  torch::NoGradGuard no_grad;

  const auto rows = read_emoji_rows(o.dataset);
  std::vector<int> train_rows, val_rows;
  for (int i = 0; i < static_cast<int>(rows.size()); ++i)
    (rows[i].split == "train" ? train_rows : val_rows).push_back(i);
  MD_CHECK(!train_rows.empty(), "{}/captions.jsonl: no training images", o.dataset);

  // Captions scored: n training ones and n_heldout held-out ones, spread evenly over the file.
  std::vector<int> picked;  // indices into rows
  for (int k : spread_indices(static_cast<int>(train_rows.size()), o.n)) picked.push_back(train_rows[k]);
  const int n_train = static_cast<int>(picked.size());
  for (int k : spread_indices(static_cast<int>(val_rows.size()), o.n_heldout)) picked.push_back(val_rows[k]);

  auto sm = load_sampling_model(o.ckpt, device);
  MD_CHECK(!sm.is_latent() && sm.model->config().in_channels == 3,
           "{}: eval-recall compares pixels; this is a latent model", o.ckpt);
  const Tensor train = load_images(o.dataset, rows, train_rows);  // (M, 3, S, S)
  MD_CHECK(train.size(2) == sm.model->config().input_size,
           "{}: images are {} px but the model makes {} px", o.dataset, train.size(2),
           sm.model->config().input_size);

  std::vector<std::string> captions;
  for (int i : picked) captions.push_back(rows[i].caption);
  auto enc = text::make_text_encoder(sm.text_encoder, {sm.caption_len, c10::kCPU});
  const Tensor emb = enc->encode(captions);
  SamplerOptions so;
  so.steps = o.steps;
  so.cfg = o.cfg;
  so.bf16 = bf16;
  fmt::print("sampling {} images: Heun {} steps, guidance {}, {}\n", picked.size(), o.steps, o.cfg,
             sampling_precision_text(bf16, device.is_cuda()));
  ProgressBar bar("eval-recall", static_cast<int64_t>(picked.size()), "img");
  int64_t shown = 0;
  const Tensor samples = generate_images(*sm.model, emb, o.seed, sm.edm, so, o.batch, [&](int64_t done) {
    bar.advance(done - shown);
    shown = done;
  });
  bar.finish();
  // Compare what a user sees: the samples as 8-bit pictures.
  std::vector<Tensor> seen;
  for (int64_t i = 0; i < samples.size(0); ++i) seen.push_back(image_to_tensor(tensor_to_image(samples[i])));
  const Tensor nn = nearest_images(at::stack(seen), train, 5);  // (N, 5) indices into train_rows

  RecallScore tr, held;
  std::vector<Image> cells;
  for (int s = 0; s < static_cast<int>(picked.size()); ++s) {
    const EmojiRow& want = rows[picked[s]];
    const int64_t* near = nn[s].data_ptr<int64_t>();
    RecallScore& sc = s < n_train ? tr : held;
    sc.n++;
    sc.subgroup += rows[train_rows[near[0]]].subgroup == want.subgroup;
    if (s < n_train) {
      for (int k = 0; k < nn.size(1); ++k) {
        if (train_rows[near[k]] != picked[s]) continue;
        sc.top1 += k == 0;
        sc.top5 += 1;
      }
      // The picture: the captioned emoji, the sample, its nearest training image.
      cells.push_back(resize(read_png(o.dataset + "/" + want.file), 64, 64));
      cells.push_back(resize(tensor_to_image(samples[s]), 64, 64));
      cells.push_back(resize(read_png(o.dataset + "/" + rows[train_rows[near[0]]].file), 64, 64));
    }
  }
  fmt::print("training captions ({}): top-1 {}/{} = {:.1f}%, top-5 {}/{} = {:.1f}%, subgroup {}/{} = {:.1f}%\n",
             tr.n, tr.top1, tr.n, tr.pct(tr.top1), tr.top5, tr.n, tr.pct(tr.top5), tr.subgroup, tr.n,
             tr.pct(tr.subgroup));
  if (held.n)
    fmt::print("held-out captions ({}): subgroup {}/{} = {:.1f}%\n", held.n, held.subgroup, held.n,
               held.pct(held.subgroup));
  if (!o.out.empty()) {
    write_png(o.out, make_grid(cells, 12));
    fmt::print("grid: {} (each triple: the captioned emoji, the sample, its nearest training image)\n", o.out);
  }
  if (!o.summary.empty()) {
    const nlohmann::ordered_json j = {{"checkpoint", o.ckpt},   {"dataset", o.dataset},
                                      {"steps", o.steps},       {"cfg", o.cfg},
                                      {"seed", o.seed},         {"precision", bf16 ? "bf16" : "fp32"},
                                      {"train", score_json(tr, true)},
                                      {"heldout", score_json(held, false)}};
    update_summary(o.summary, "recall", j);
    fmt::print("summary: {} (key \"recall\")\n", o.summary);
  }
  MD_CHECK(tr.pct(tr.top5) >= 100 * o.min_top5 - 1e-9, "top-5 recall {:.1f}% is below {:.0f}%",
           tr.pct(tr.top5), 100 * o.min_top5);
  MD_CHECK(tr.pct(tr.subgroup) >= 100 * o.min_subgroup - 1e-9, "subgroup recall {:.1f}% is below {:.0f}%",
           tr.pct(tr.subgroup), 100 * o.min_subgroup);
}

}  // namespace

void register_eval_recall(CLI::App& app) {
  auto o = std::make_shared<RecallOptions>();
  auto* cmd = app.add_subcommand(
      "eval-recall", "does the model draw the captioned emoji? (nearest training image in pixel space)");
  cmd->add_option("--ckpt", o->ckpt, "training checkpoint")->required();
  cmd->add_option("--dataset", o->dataset, "the emoji dataset it was trained on (captions.jsonl + images/)")
      ->required();
  cmd->add_option("--n", o->n, "training captions scored (spread evenly over the set)")->capture_default_str();
  cmd->add_option("--n-heldout", o->n_heldout, "held-out captions scored (subgroup only)")->capture_default_str();
  cmd->add_option("--steps", o->steps, "sampler steps (Heun)")->capture_default_str();
  cmd->add_option("--cfg", o->cfg, "guidance scale")->capture_default_str();
  cmd->add_option("--seed", o->seed, "noise seed (sample i uses seed + i)")->capture_default_str();
  cmd->add_option("--batch", o->batch, "images per sampling batch")->capture_default_str();
  cmd->add_option("--out", o->out, "write a PNG: captioned emoji, sample, nearest training image");
  cmd->add_option("--summary", o->summary, "JSON file to record the figures in (key \"recall\")");
  cmd->add_option("--min-top5", o->min_top5, "fail below this top-5 fraction")->capture_default_str();
  cmd->add_option("--min-subgroup", o->min_subgroup, "fail below this subgroup fraction")->capture_default_str();
  add_precision_option(*cmd, o->precision);
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
