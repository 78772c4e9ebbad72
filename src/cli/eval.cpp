// microdit eval fid | clip-score | coco: the paper's metrics, computed as the Python tools do
// (pytorch-fid's FID, torchmetrics' CLIP score with an open_clip model). See docs/eval.md.
#include <torch/csrc/autograd/grad_mode.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <optional>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/precision.h"
#include "core/progress.h"
#include "data/image_io.h"
#include "eval/clip_image.h"
#include "eval/fid.h"
#include "eval/sampling.h"
#include "io/atomic_file.h"
#include "text/encoder.h"
#include "vae/autoencoder_kl.h"

namespace microdit::cli {

namespace {

bool is_npz(const std::string& p) { return p.size() > 4 && p.ends_with(".npz"); }

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  MD_CHECK(in.good(), "{}: cannot open the captions file", path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) {
    if (!l.empty() && l.back() == '\r') l.pop_back();
    lines.push_back(l);
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  MD_CHECK(!lines.empty(), "{}: the captions file is empty", path);
  return lines;
}

// Statistics of a folder (Inception features) or read from a .npz.
FidStats stats_of(const std::string& src, const std::string& inception, FIDInceptionV3& net, int batch,
                  c10::Device device, const std::string& label) {
  if (is_npz(src)) return read_fid_stats(src);
  const auto files = list_image_files(src);
  MD_CHECK(files.size() >= 2, "{}: FID needs at least 2 images, found {}", src, files.size());
  MD_CHECK(!inception.empty(), "{}: computing statistics of a folder needs --inception W (pytorch-fid's "
           "pt_inception-2015-12-05 weights)", src);
  if (!net) net = load_fid_inception(inception, device);
  ProgressBar bar("inception " + label, int64_t(files.size()), "img");
  auto f = inception_features(*net, files, batch, device, [&](int64_t d) { bar.update(d); });
  bar.finish();
  return fid_stats_from_features(f);
}

struct FidOptions {
  RuntimeOptions rt;
  std::string real, fake, inception, save_stats;
  int batch = 50;
};

void run_fid(const FidOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  MD_CHECK(!o.fake.empty() || !o.save_stats.empty(), "give --fake DIR|stats.npz (or --save-stats to only save --real's statistics)");
  MD_CHECK(o.batch >= 1, "--batch must be >= 1");
  FIDInceptionV3 net{nullptr};
  if (o.fake.empty()) {
    MD_CHECK(!is_npz(o.real), "--real is already a statistics file");
    write_fid_stats(o.save_stats, stats_of(o.real, o.inception, net, o.batch, device, "real"));
    fmt::print("wrote {}\n", o.save_stats);
    return;
  }
  // A statistics file against a folder must hold 2048-d Inception statistics (checked before
  // the folder's features are computed); two statistics files need only agree.
  auto check = [&](const std::string& path, const FidStats& st) {
    MD_CHECK(!is_npz(path) || (is_npz(o.real) && is_npz(o.fake)) || st.mu.size(0) == kInceptionDims,
             "{}: statistics of dimension {}, the FID Inception gives {}", path, st.mu.size(0), kInceptionDims);
  };
  std::optional<FidStats> fake0;
  if (is_npz(o.fake)) check(o.fake, *(fake0 = read_fid_stats(o.fake)));
  const auto real = stats_of(o.real, o.inception, net, o.batch, device, "real");
  check(o.real, real);
  const auto fake = fake0 ? *fake0 : stats_of(o.fake, o.inception, net, o.batch, device, "fake");
  if (!o.save_stats.empty()) {
    write_fid_stats(o.save_stats, fake);
    fmt::print("wrote {} (statistics of --fake)\n", o.save_stats);
  }
  fmt::print("FID: {:.4f}\n", frechet_distance(real, fake));
}

// CLIP scores of images (sorted names) against captions (line i <-> image i).
Tensor clip_scores_of(ClipScorer& clip, const std::vector<std::string>& files, const std::vector<std::string>& caps,
                      int batch) {
  ProgressBar bar("clip", int64_t(files.size()), "img");
  std::vector<Tensor> out;
  for (size_t s = 0; s < files.size(); s += size_t(batch)) {
    const size_t e = std::min(files.size(), s + size_t(batch));
    std::vector<Tensor> px;
    for (size_t i = s; i < e; ++i) px.push_back(clip_preprocess(decode_image_file(files[i]), clip.image_size()));
    auto fi = clip.image_features(at::stack(px));
    auto ft = clip.text_features(clip.tokenize({caps.begin() + long(s), caps.begin() + long(e)}));
    out.push_back(clip_scores(fi, ft));
    bar.update(int64_t(e));
  }
  bar.finish();
  return at::cat(out);
}

struct ClipOptions {
  RuntimeOptions rt;
  std::string images, captions, clip;
  int batch = 32;
  bool quick_gelu = false;
};

void run_clip(const ClipOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  MD_CHECK(o.batch >= 1, "--batch must be >= 1");
  const auto files = list_image_files(o.images);
  const auto caps = read_lines(o.captions);
  MD_CHECK(caps.size() == files.size(), "{} has {} captions for {} images in {} (one line per image, in name order)",
           o.captions, caps.size(), files.size(), o.images);
  ClipScorer clip(o.clip, device, o.quick_gelu);
  const auto s = clip_scores_of(clip, files, caps, o.batch);
  fmt::print("CLIP score: {:.4f} ({} images)\n", clip_score(s), files.size());
}

struct CocoOptions {
  RuntimeOptions rt;
  std::string ckpt, vae, captions, stats, inception, clip, out, precision = "auto";
  int n = 30000, steps = 30, batch = 16, grid = 16;
  double cfg = 4.0;
  uint64_t seed = 0;
  bool quick_gelu = false;
};

void run_coco(const CocoOptions& o) {
  set_threads(o.rt.threads);
  const auto device = resolve_device(o.rt.device);
  const bool bf16 = sampling_bf16(o.precision, device.is_cuda());
  MD_CHECK(o.n >= 2 && o.batch >= 1 && o.steps >= 1, "--n must be >= 2, --batch and --steps >= 1");
  // Check every input before the long generation.
  const auto caps_all = read_lines(o.captions);
  MD_CHECK(int64_t(caps_all.size()) >= o.n, "{} has {} captions, --n asks for {}", o.captions, caps_all.size(), o.n);
  const std::vector<std::string> caps(caps_all.begin(), caps_all.begin() + o.n);
  const auto ref = read_fid_stats(o.stats);
  MD_CHECK(ref.mu.size(0) == kInceptionDims, "{}: statistics of dimension {}, the FID Inception gives {}", o.stats,
           ref.mu.size(0), kInceptionDims);
  auto net = load_fid_inception(o.inception, device);
  ClipScorer clip(o.clip, device, o.quick_gelu);
  clip.tokenize({caps[0]});  // the BPE vocabulary is there (before hours of sampling)
  auto sm = load_sampling_model(o.ckpt, device);
  const auto& mc = sm.model->config();
  MD_CHECK(!sm.is_latent() || !o.vae.empty(), "{}: a latent model needs --vae W", o.ckpt);
  AutoencoderKL vae{nullptr};
  if (sm.is_latent()) vae = load_vae(o.vae, device, device.is_cuda() ? at::kBFloat16 : at::kFloat);
  auto enc = text::make_text_encoder(sm.text_encoder, {sm.caption_len, c10::kCPU});
  const std::string dir = o.out + "/images";
  MD_CHECK(make_dirs(dir), "{}: cannot create the folder", dir);
  auto name = [&](int64_t i) { return fmt::format("{}/{:06d}.png", dir, i); };
  SamplerOptions so;
  so.steps = o.steps;
  so.cfg = o.cfg;
  so.bf16 = bf16;
  fmt::print("{}\ngenerating {} images into {} ({} steps, guidance {}, seed {}, {}; existing images are kept)\n",
             runtime_summary(device), o.n, dir, o.steps, o.cfg, o.seed,
             sampling_precision_text(bf16, device.is_cuda()));
  int64_t kept = 0;
  for (int64_t i = 0; i < o.n; ++i) kept += is_regular_file(name(i));
  ProgressBar bar("generate", o.n - kept, "img");
  int64_t made = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < o.n; s += o.batch) {
    const int64_t e = std::min<int64_t>(o.n, s + o.batch);
    std::vector<int64_t> todo;
    for (int64_t i = s; i < e; ++i)
      if (!is_regular_file(name(i))) todo.push_back(i);
    if (todo.empty()) continue;
    // Image i always starts from the noise of seed + i: a resumed run makes the same images.
    const int64_t a = todo.front(), b = todo.back() + 1;
    auto emb = enc->encode({caps.begin() + a, caps.begin() + b});
    MD_CHECK(emb.size(2) == mc.caption_channels, "the text encoder gives {}-wide embeddings, the model takes {}",
             emb.size(2), mc.caption_channels);
    auto x = generate_images(*sm.model, emb, o.seed + uint64_t(a), sm.edm, so, b - a);
    std::vector<Image> pics;
    if (sm.is_latent()) {
      torch::NoGradGuard ng;
      pics = vae_output_to_images(vae->decode(x.to(device) / sm.latent_scale).to(at::kCPU, at::kFloat));
    } else {
      pics = tensor_to_images(x);
    }
    for (int64_t i : todo) write_png(name(i), pics[size_t(i - a)]);
    made += int64_t(todo.size());
    bar.update(made);
  }
  bar.finish();
  const double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<std::string> mine;
  for (int64_t i = 0; i < o.n; ++i) mine.push_back(name(i));
  ProgressBar ibar("inception", o.n, "img");
  auto feats = inception_features(*net, mine, 50, device, [&](int64_t d) { ibar.update(d); });
  ibar.finish();
  const double fid = frechet_distance(ref, fid_stats_from_features(feats));
  const auto scores = clip_scores_of(clip, mine, caps, 32);
  const double cs = clip_score(scores);
  std::vector<Image> cells;
  for (int64_t i = 0; i < std::min<int64_t>(o.grid, o.n); ++i) cells.push_back(decode_image_file(name(i)));
  write_png(o.out + "/grid.png", make_grid(cells, 4));
  nlohmann::json j = {{"fid", fid}, {"clip_score", cs}, {"n", o.n}, {"ckpt", o.ckpt}, {"captions", o.captions},
                      {"stats", o.stats}, {"inception", o.inception}, {"clip", o.clip}, {"steps", o.steps},
                      {"cfg", o.cfg}, {"seed", o.seed}, {"generated", made}, {"kept", kept},
                      {"generate_seconds", gen_s}, {"ema", sm.ema}, {"precision", bf16 ? "bf16" : "fp32"}};
  write_file_atomic(o.out + "/eval.json", j.dump(1) + "\n");
  fmt::print("FID: {:.4f}\nCLIP score: {:.4f}\nwrote {}/eval.json and {}/grid.png\n", fid, cs, o.out, o.out);
}

}  // namespace

void register_eval(CLI::App& app) {
  auto* ev = app.add_subcommand("eval", "FID, CLIP score and the COCO-30k protocol (docs/eval.md)");
  ev->require_subcommand(1);

  auto f = std::make_shared<FidOptions>();
  auto* fid = ev->add_subcommand("fid", "FID between two image folders or pytorch-fid .npz statistics");
  fid->add_option("--real", f->real, "reference images (folder) or statistics (.npz)")->required();
  fid->add_option("--fake", f->fake, "generated images (folder) or statistics (.npz)");
  fid->add_option("--inception", f->inception, "pytorch-fid's FID Inception weights (.pth or .safetensors)");
  fid->add_option("--save-stats", f->save_stats, "write the statistics of --fake (or of --real alone) as .npz");
  fid->add_option("--batch", f->batch, "images per Inception batch")->capture_default_str();
  add_runtime_options(*fid, f->rt);
  fid->callback([f] { run_fid(*f); });

  auto c = std::make_shared<ClipOptions>();
  auto* cs = ev->add_subcommand("clip-score", "torchmetrics' CLIP score of images against their captions");
  cs->add_option("--images", c->images, "image folder (name order = caption order)")->required();
  cs->add_option("--captions", c->captions, "one caption per line")->required();
  cs->add_option("--clip", c->clip, "open_clip CLIP weights (.safetensors or .pth), e.g. ViT-H-14")->required();
  cs->add_option("--batch", c->batch, "images per batch")->capture_default_str();
  cs->add_flag("--quick-gelu", c->quick_gelu, "OpenAI-style QuickGELU towers");
  add_runtime_options(*cs, c->rt);
  cs->callback([c] { run_clip(*c); });

  auto k = std::make_shared<CocoOptions>();
  auto* coco = ev->add_subcommand("coco", "generate from captions, then FID and CLIP score (COCO-30k protocol)");
  coco->add_option("--ckpt", k->ckpt, "training checkpoint")->required();
  coco->add_option("--vae", k->vae, "VAE for latent models");
  coco->add_option("--captions", k->captions, "one caption per line (the first --n are used)")->required();
  coco->add_option("--stats", k->stats, "reference statistics (.npz, pytorch-fid format)")->required();
  coco->add_option("--n", k->n, "images to generate")->capture_default_str();
  coco->add_option("--inception", k->inception, "FID Inception weights")->required();
  coco->add_option("--clip", k->clip, "open_clip CLIP weights")->required();
  coco->add_option("--out", k->out, "output folder (images/, eval.json, grid.png)")->required();
  coco->add_option("--steps", k->steps, "sampler steps")->capture_default_str();
  coco->add_option("--cfg", k->cfg, "guidance scale")->capture_default_str();
  coco->add_option("--seed", k->seed, "noise seed (image i uses seed + i)")->capture_default_str();
  coco->add_option("--batch", k->batch, "images per sampling batch")->capture_default_str();
  coco->add_flag("--quick-gelu", k->quick_gelu, "OpenAI-style QuickGELU CLIP");
  add_precision_option(*coco, k->precision);
  add_runtime_options(*coco, k->rt);
  coco->callback([k] { run_coco(*k); });
}

}  // namespace microdit::cli
