// microdit vae encode|decode|parity: the SDXL VAE on one image (a round trip a person can
// look at) and the comparison with vectors written by tools/make_vae_fixtures.py.
#include <fmt/format.h>
#include <torch/torch.h>

#include <chrono>
#include <functional>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "data/image.h"
#include "data/image_io.h"
#include "io/safetensors.h"
#include "vae/autoencoder_kl.h"

namespace microdit::cli {

namespace {

struct VaeOptions {
  RuntimeOptions rt;
  std::string vae, image, latents, out, vectors, dtype = "auto";
  int size = 256;
  bool sample = false;
  int64_t seed = 0;
  double tol = 1e-5;
  int batch = 1, reps = 2;
  bool nchw = false, reference_upsample = false;
};

c10::ScalarType parse_dtype(const std::string& s, const c10::Device& device) {
  if (s == "auto") return device.is_cpu() ? at::kFloat : at::kBFloat16;
  if (s == "float32" || s == "fp32") return at::kFloat;
  if (s == "bfloat16" || s == "bf16") return at::kBFloat16;
  if (s == "float16" || s == "fp16") return at::kHalf;
  fail("--dtype must be auto, float32, bfloat16 or float16, got '{}'", s);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Loaded {
  c10::Device device = c10::kCPU;
  AutoencoderKL vae{nullptr};
};

Loaded load(const VaeOptions& o) {
  set_threads(o.rt.threads);
  MD_CHECK(!o.vae.empty(), "give --vae (a diffusers VAE folder or a .safetensors file)");
  Loaded l;
  l.device = resolve_device(o.rt.device);
  l.vae = load_vae(o.vae, l.device, parse_dtype(o.dtype, l.device));
  return l;
}

void check_out_folder(const std::string& out) {
  MD_CHECK(!out.empty(), "give --out");
  const auto slash = out.rfind('/');
  if (slash != std::string::npos && slash > 0)
    MD_CHECK(is_directory(out.substr(0, slash)), "{}: the output folder does not exist", out);
  MD_CHECK(!is_directory(out), "{}: is a folder, expected a file name", out);
}

void run_encode(const VaeOptions& o) {
  MD_CHECK(o.size >= 8 && o.size % 8 == 0 && o.size <= 4096, "--size must be a multiple of 8 in [8, 4096], got {}",
           o.size);
  MD_CHECK(!o.image.empty(), "give --image");
  check_out_folder(o.out);
  const Image img = decode_image_file(o.image);  // before the VAE: a bad image fails fast
  const auto x = reference_preprocess(img, o.size).unsqueeze(0);  // (1, 3, S, S) in [-1, 1]
  auto l = load(o);
  const auto t0 = std::chrono::steady_clock::now();
  const Posterior post = l.vae->encode(x);
  at::Tensor z = post.mean;
  if (o.sample) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(o.seed));
    z = post.sample_with_noise(at::randn(post.mean.sizes(), gen, at::TensorOptions().dtype(at::kFloat))
                                   .to(post.mean.options()));
  }
  const auto latents = scale_latents(z.to(at::kFloat), l.vae->config()).cpu().contiguous();
  const double secs = seconds_since(t0);
  write_safetensors(o.out, {{"latents", latents}},
                    {{"scaling_factor", fmt::format("{}", l.vae->config().scaling_factor)},
                     {"shift_factor", fmt::format("{}", l.vae->config().shift_factor)},
                     {"size", std::to_string(o.size)},
                     {"posterior", o.sample ? fmt::format("sample seed {}", o.seed) : "mean"}});
  fmt::print("{}: {}x{} -> {} latents {} (x {}), encoded in {:.2f} s\n", o.out, img.width, img.height,
             o.sample ? "sampled" : "mean", c10::str(latents.sizes()), l.vae->config().scaling_factor, secs);
}

void run_decode(const VaeOptions& o) {
  MD_CHECK(!o.latents.empty(), "give --latents");
  check_out_folder(o.out);
  const auto file = read_safetensors(o.latents);
  const at::Tensor* t = file.find("latents");
  MD_CHECK(t, "{}: no tensor 'latents' in this file", o.latents);
  at::Tensor z = *t;
  if (z.dim() == 3) z = z.unsqueeze(0);
  MD_CHECK(z.is_floating_point(), "{}: tensor 'latents' has dtype {}, expected floating point", o.latents,
           c10::toString(z.scalar_type()));
  MD_CHECK(z.dim() == 4 && z.size(0) >= 1 && z.size(2) >= 1 && z.size(3) >= 1,
           "{}: tensor 'latents' has shape {}, expected (B, C, h, w)", o.latents, c10::str(t->sizes()));
  auto l = load(o);
  const int64_t C = l.vae->config().latent_channels;
  MD_CHECK(z.size(1) == C, "{}: tensor 'latents' has {} channels but the VAE {} expects {}", o.latents,
           z.size(1), o.vae, C);
  MD_CHECK(torch::isfinite(z).all().item<bool>(), "{}: tensor 'latents' holds NaN or infinite values", o.latents);
  const auto t0 = std::chrono::steady_clock::now();
  auto images = decode_latents_to_images(l.vae, z);
  const double secs = seconds_since(t0);
  const Image out = images.size() == 1 ? std::move(images[0])
                                       : make_grid(images, static_cast<int>(images.size()), 2);
  write_png(o.out, out);
  fmt::print("{}: {} image(s) of {}x{} decoded in {:.2f} s\n", o.out, images.size(), z.size(3) * 8, z.size(2) * 8,
             secs);
}

// Max |a - b| and that over max |b|; fails beyond the tolerance (relative to max(1, max |b|)).
bool compare(const std::string& name, const at::Tensor& got, const at::Tensor& want, double tol) {
  MD_CHECK(got.sizes() == want.sizes(), "{}: shape {} but the vectors hold {}", name, c10::str(got.sizes()),
           c10::str(want.sizes()));
  const auto g = got.detach().to(at::kCPU, at::kDouble), w = want.to(at::kDouble);
  const double err = (g - w).abs().max().item<double>(), scale = w.abs().max().item<double>();
  const double rel = err / std::max(1.0, scale);
  const bool ok = rel <= tol;
  fmt::print("{:<8} max |err| {:.3e}  max |ref| {:.3e}  err / max(1, |ref|) {:.3e}  {}\n", name, err, scale, rel,
             ok ? "ok" : "FAIL");
  return ok;
}

void run_parity(const VaeOptions& o) {
  MD_CHECK(!o.vectors.empty(), "give --vectors");
  const auto v = read_safetensors(o.vectors);
  for (const char* k : {"x", "mean", "logvar", "eps", "sample", "z", "decoded"})
    MD_CHECK(v.find(k), "{}: no tensor '{}' (write it with tools/make_vae_fixtures.py)", o.vectors, k);
  auto l = load(o);
  fmt::print("{} on {}, {}\n", l.vae->config().summary(), l.device.str(), c10::toString(l.vae->dtype()));
  const auto t0 = std::chrono::steady_clock::now();
  const auto post = l.vae->encode(v.at("x"));
  bool ok = compare("mean", post.mean, v.at("mean"), o.tol);
  ok = compare("logvar", post.logvar, v.at("logvar"), o.tol) && ok;
  ok = compare("sample", post.sample_with_noise(v.at("eps")), v.at("sample"), o.tol) && ok;
  ok = compare("decoded", l.vae->decode(v.at("z")), v.at("decoded"), o.tol) && ok;
  fmt::print("{} in {:.2f} s\n", ok ? "parity ok" : "parity FAILED", seconds_since(t0));
  MD_CHECK(ok, "{}: VAE output differs from the vectors by more than {}", o.vectors, o.tol);
}


// Images/s of encode and decode at one size and batch: the best of `reps` timed runs after an
// untimed warm-up on a 64 px input (the figures in docs/vae.md; tools/bench_vae.py runs it).
void run_bench(const VaeOptions& o) {
  MD_CHECK(o.size >= 8 && o.size % 8 == 0, "--size must be a multiple of 8, got {}", o.size);
  MD_CHECK(o.batch >= 1 && o.reps >= 1, "--batch and --reps must be >= 1");
  auto l = load(o);
  if (o.nchw) l.vae->set_channels_last(false);
  if (o.reference_upsample) l.vae->set_phase_upsample(false);
  const auto& c = l.vae->config();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  const auto x = (at::rand({o.batch, c.in_channels, o.size, o.size}, gen) * 2 - 1).to(l.device);
  const int64_t h = o.size / c.downsample_factor();
  const auto z = at::randn({o.batch, c.latent_channels, h, h}, gen).to(l.device);
  auto sync = [&] {
    if (l.device.is_cuda()) torch::cuda::synchronize();
  };
  const int64_t w = std::min(o.size, 64);
  l.vae->decode(l.vae->encode(x.narrow(2, 0, w).narrow(3, 0, w)).mean);  // warm-up
  sync();
  auto best = [&](const std::function<void()>& f) {
    double b = 1e30;
    for (int r = 0; r < o.reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      f();
      sync();
      b = std::min(b, seconds_since(t0));
    }
    return b;
  };
  const double enc = best([&] { l.vae->encode(x); });
  const double dec = best([&] { l.vae->decode(z); });
  fmt::print("microdit vae {} px batch {} {} {}{}{} threads {}: encode {:.3f} s ({:.3f} img/s), decode {:.3f} s "
             "({:.3f} img/s)\n",
             o.size, o.batch, l.device.str(), c10::toString(l.vae->dtype()),
             l.vae->channels_last() ? " channels-last" : " NCHW", o.reference_upsample ? " reference-upsample" : "",
             at::get_num_threads(), enc,
             o.batch / enc, dec, o.batch / dec);
}

}  // namespace

void register_vae(CLI::App& app) {
  auto* vae = app.add_subcommand("vae", "the SDXL VAE (diffusers AutoencoderKL): encode, decode, parity");
  vae->require_subcommand(1);
  auto add_common = [](CLI::App* cmd, VaeOptions& o) {
    cmd->add_option("--vae", o.vae, "diffusers VAE folder (config.json + weights) or a .safetensors file")
        ->required();
    cmd->add_option("--dtype", o.dtype, "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
        ->capture_default_str();
    add_runtime_options(*cmd, o.rt);
  };

  auto enc = std::make_shared<VaeOptions>();
  auto* e = vae->add_subcommand("encode", "image -> latents (posterior mean x scaling factor), .safetensors");
  add_common(e, *enc);
  e->add_option("--image", enc->image, "JPEG, PNG or WebP file")->required();
  e->add_option("--size", enc->size, "resize the short side and centre-crop to this (as the reference)")
      ->capture_default_str();
  e->add_flag("--sample", enc->sample, "store a posterior sample instead of the mean (as precompute does)");
  e->add_option("--seed", enc->seed, "noise seed for --sample")->capture_default_str();
  e->add_option("--out", enc->out, "output .safetensors (tensor 'latents', (1, C, S/8, S/8))")->required();
  e->callback([enc] { run_encode(*enc); });

  auto dec = std::make_shared<VaeOptions>();
  auto* d = vae->add_subcommand("decode", "latents (x scaling factor) -> PNG");
  add_common(d, *dec);
  d->add_option("--latents", dec->latents, ".safetensors with tensor 'latents' (B, C, h, w) or (C, h, w)")
      ->required();
  d->add_option("--out", dec->out, "output PNG (a row of images when B > 1)")->required();
  d->callback([dec] { run_decode(*dec); });

  auto par = std::make_shared<VaeOptions>();
  auto* p = vae->add_subcommand("parity", "compare with vectors from tools/make_vae_fixtures.py");
  add_common(p, *par);
  p->add_option("--vectors", par->vectors, ".safetensors with x, mean, logvar, eps, sample, z, decoded")
      ->required();
  p->add_option("--tol", par->tol, "max |err| / max(1, max |ref|) per tensor")->capture_default_str();
  p->callback([par] { run_parity(*par); });

  auto ben = std::make_shared<VaeOptions>();
  auto* b = vae->add_subcommand("bench", "encode and decode images/s on random inputs");
  add_common(b, *ben);
  b->add_option("--size", ben->size, "image size (square)")->capture_default_str();
  b->add_option("--batch", ben->batch, "images per call")->capture_default_str();
  b->add_option("--reps", ben->reps, "timed runs (the best counts)")->capture_default_str();
  b->add_flag("--nchw", ben->nchw, "keep NCHW memory layout (ablation)");
  b->add_flag("--reference-upsample", ben->reference_upsample, "upsample, then 3x3 conv, as diffusers (ablation)");
  b->callback([ben] { run_bench(*ben); });
}

}  // namespace microdit::cli
