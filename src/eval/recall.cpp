#include "eval/recall.h"

#include <ATen/ATen.h>
#include "core/error.h"

namespace microdit {

std::vector<int> spread_indices(int count, int n) {
  std::vector<int> out;
  if (count <= 0 || n <= 0) return out;
  if (n >= count) n = count;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<int>(static_cast<int64_t>(i) * count / n));
  return out;
}

at::Tensor nearest_images(const at::Tensor& samples, const at::Tensor& train, int k) {
  MD_CHECK(samples.dim() == 4 && train.dim() == 4 && samples.sizes().slice(1) == train.sizes().slice(1),
           "samples {} and training images {} differ in shape", c10::str(samples.sizes()),
           c10::str(train.sizes()));
  k = static_cast<int>(std::min<int64_t>(k, train.size(0)));
  const auto a = samples.reshape({samples.size(0), -1}).to(at::kDouble);  // (N, C*H*W)
  const auto b = train.reshape({train.size(0), -1}).to(at::kDouble);      // (M, C*H*W)
  // |a - b|^2 = |a|^2 - 2 a.b + |b|^2, in float64 so near-ties order the same everywhere.
  const auto d = a.pow(2).sum(1, true) - 2 * at::mm(a, b.t()) + b.pow(2).sum(1).unsqueeze(0);  // (N, M)
  return std::get<1>(d.topk(k, 1, /*largest=*/false, /*sorted=*/true));
}

}  // namespace microdit
