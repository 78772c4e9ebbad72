#include "eval/fid.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>

#include "core/error.h"
#include "core/fs.h"
#include "data/image_io.h"
#include "eval/npz.h"

namespace microdit {

FidStats fid_stats_from_features(const at::Tensor& features) {
  MD_CHECK(features.dim() == 2, "FID features must be (N, D), got {}", features.sizes());
  MD_CHECK(features.size(0) >= 2, "FID statistics need at least 2 images, got {}", features.size(0));
  auto f = features.to(at::kCPU, at::kDouble);
  FidStats s;
  s.mu = f.mean(0);
  auto c = f - s.mu;
  s.sigma = at::mm(c.t(), c) / double(f.size(0) - 1);
  s.count = f.size(0);
  return s;
}

double frechet_distance(const FidStats& a, const FidStats& b) {
  MD_CHECK(a.mu.dim() == 1 && b.mu.dim() == 1 && a.sigma.dim() == 2 && b.sigma.dim() == 2,
           "FID statistics must be mu (D,) and sigma (D, D)");
  const int64_t d = a.mu.size(0);
  MD_CHECK(b.mu.size(0) == d, "FID statistics of different dimensions: {} and {}", d, b.mu.size(0));
  MD_CHECK(a.sigma.size(0) == d && a.sigma.size(1) == d && b.sigma.size(0) == d && b.sigma.size(1) == d,
           "FID statistics: sigma does not match mu's dimension {}", d);
  auto mu1 = a.mu.to(at::kDouble), mu2 = b.mu.to(at::kDouble);
  auto s1 = a.sigma.to(at::kDouble), s2 = b.sigma.to(at::kDouble);
  MD_CHECK(at::isfinite(mu1).all().item<bool>() && at::isfinite(mu2).all().item<bool>() &&
               at::isfinite(s1).all().item<bool>() && at::isfinite(s2).all().item<bool>(),
           "FID statistics contain NaN or infinity");
  s1 = (s1 + s1.t()) / 2, s2 = (s2 + s2.t()) / 2;
  // S1^1/2 from the eigen-decomposition (PSD: tiny negative eigenvalues are rounding).
  auto [w1, v1] = at::linalg_eigh(s1);
  auto root1 = at::mm(v1 * w1.clamp_min(0).sqrt(), v1.t());
  auto m = at::mm(at::mm(root1, s2), root1);
  auto w = at::linalg_eigvalsh((m + m.t()) / 2);
  const double tr_covmean = w.clamp_min(0).sqrt().sum().item<double>();
  const auto diff = mu1 - mu2;
  return diff.dot(diff).item<double>() + s1.trace().item<double>() + s2.trace().item<double>() - 2 * tr_covmean;
}

FidStats read_fid_stats(const std::string& path) {
  MD_CHECK(is_regular_file(path), "{}: no such statistics file", path);
  FidStats s;
  for (auto& [name, t] : read_npz(path)) {
    if (name == "mu") s.mu = t;
    if (name == "sigma") s.sigma = t;
  }
  MD_CHECK(s.mu.defined() && s.sigma.defined(), "{}: not FID statistics (needs arrays 'mu' and 'sigma')", path);
  MD_CHECK(s.mu.dim() == 1 && s.sigma.dim() == 2 && s.sigma.size(0) == s.mu.size(0) &&
               s.sigma.size(1) == s.mu.size(0),
           "{}: mu {} and sigma {} do not fit together", path, s.mu.sizes(), s.sigma.sizes());
  MD_CHECK(s.mu.is_floating_point() && s.sigma.is_floating_point(), "{}: mu and sigma must be floating point", path);
  s.mu = s.mu.to(at::kDouble), s.sigma = s.sigma.to(at::kDouble);
  return s;
}

void write_fid_stats(const std::string& path, const FidStats& s) {
  write_npz(path, {{"mu", s.mu.to(at::kCPU, at::kDouble)}, {"sigma", s.sigma.to(at::kCPU, at::kDouble)}});
}

std::vector<std::string> list_image_files(const std::string& dir) {
  MD_CHECK(is_directory(dir), "{}: no such folder", dir);
  std::vector<std::string> files;
  for (const auto& n : list_dir(dir)) {
    const auto dot = n.rfind('.');
    if (dot == std::string::npos) continue;
    std::string ext = n.substr(dot + 1);
    for (auto& c : ext) c = char(std::tolower(static_cast<unsigned char>(c)));
    if (ext == "png" || ext == "jpg" || ext == "jpeg" || ext == "webp") files.push_back(dir + "/" + n);
  }
  MD_CHECK(!files.empty(), "{}: no images (.png, .jpg, .jpeg, .webp) in the folder", dir);
  return files;
}

at::Tensor load_images01(const std::vector<std::string>& files, int* expect_w, int* expect_h) {
  std::vector<at::Tensor> out;
  int w0 = expect_w && *expect_w ? *expect_w : 0, h0 = expect_h && *expect_h ? *expect_h : 0;
  for (const auto& f : files) {
    const Image im = decode_image_file(f);
    if (!w0) w0 = im.width, h0 = im.height;
    MD_CHECK(im.width == w0 && im.height == h0, "{}: image is {}x{}, the others {}x{} (images of one size needed)", f,
             im.width, im.height, w0, h0);
    auto t = at::from_blob(const_cast<uint8_t*>(im.pixels.data()), {im.height, im.width, 3}, at::kByte);
    out.push_back(t.permute({2, 0, 1}).to(at::kFloat) / 255.0f);  // ToTensor: float32 v / 255
  }
  if (expect_w) *expect_w = w0;
  if (expect_h) *expect_h = h0;
  return at::stack(out);
}

at::Tensor inception_features(FIDInceptionV3Impl& net, const std::vector<std::string>& files, int64_t batch,
                              c10::Device device, const std::function<void(int64_t)>& progress) {
  torch::NoGradGuard ng;
  MD_CHECK(batch >= 1, "batch size must be >= 1");
  std::vector<at::Tensor> feats;
  int w = 0, h = 0;
  for (size_t s = 0; s < files.size(); s += size_t(batch)) {
    const size_t e = std::min(files.size(), s + size_t(batch));
    auto x = load_images01({files.begin() + long(s), files.begin() + long(e)}, &w, &h);
    feats.push_back(net.forward(x.to(device)).to(at::kCPU, at::kFloat));
    if (progress) progress(int64_t(e));
  }
  return at::cat(feats);
}

}  // namespace microdit
