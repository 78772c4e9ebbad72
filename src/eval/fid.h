// Fréchet Inception Distance as pytorch-fid computes it: pool3 features of every image, their
// mean and covariance (np.cov, N - 1 denominator) in float64, and
//   d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).
// The trace of the matrix square root is taken from the eigenvalues of the symmetric
// S1^1/2 S2 S1^1/2 (same eigenvalues as S1 S2), which stays real and stable for the
// rank-deficient covariances of small sample sets where scipy's sqrtm needs pytorch-fid's
// eps offset. Statistics files are pytorch-fid's .npz (arrays "mu" and "sigma").
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "eval/inception.h"

namespace microdit {

struct FidStats {
  at::Tensor mu;     // (D,) float64
  at::Tensor sigma;  // (D, D) float64
  int64_t count = 0;  // images behind the statistics (0: unknown, e.g. a published file)
};

// features (N, D), N >= 2 -> mean and unbiased covariance in float64.
FidStats fid_stats_from_features(const at::Tensor& features);
// The squared Fréchet distance (what everyone calls FID). Throws an Error when the
// dimensions differ or a statistic is not finite.
double frechet_distance(const FidStats& a, const FidStats& b);

// pytorch-fid's .npz (mu, sigma; extra arrays ignored). Errors name the file.
FidStats read_fid_stats(const std::string& path);
void write_fid_stats(const std::string& path, const FidStats& stats);

// The image files of a folder that pytorch-fid would take (bmp/jpg/jpeg/pgm/png/ppm/tif/tiff/
// webp; here decoded: jpg/jpeg/png/webp), sorted by name. Errors for a missing folder or one
// without images.
std::vector<std::string> list_image_files(const std::string& dir);

// Decodes the files (as PIL .convert("RGB")) into (B, 3, H, W) float in [0, 1]. All images
// must have one size (pytorch-fid batches them unresized); errors name the odd file.
at::Tensor load_images01(const std::vector<std::string>& files, int* expect_w = nullptr, int* expect_h = nullptr);

// Pool3 features of every file, `batch` at a time; progress(done) after each batch.
at::Tensor inception_features(FIDInceptionV3Impl& net, const std::vector<std::string>& files, int64_t batch,
                              c10::Device device, const std::function<void(int64_t)>& progress = nullptr);

}  // namespace microdit
