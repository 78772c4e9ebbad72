#include "model/masking.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace microdit {

TokenMask mask_from_noise(const Tensor& noise, int64_t keep) {
  MD_CHECK(noise.dim() == 2, "mask noise must be (B, T), got {} dims", noise.dim());
  const int64_t T = noise.size(1);
  MD_CHECK(keep >= 1 && keep <= T, "mask keeps {} of {} tokens: need 1..{}", keep, T, T);
  TokenMask m;
  auto ids_shuffle = at::argsort(noise, /*dim=*/1, /*descending=*/false);  // small noise is kept
  m.ids_restore = at::argsort(ids_shuffle, /*dim=*/1, /*descending=*/false);
  m.ids_keep = ids_shuffle.narrow(1, 0, keep).contiguous();
  auto removed = at::ones(noise.sizes(), noise.options().dtype(at::kFloat));
  removed.narrow(1, 0, keep).zero_();
  m.mask = at::gather(removed, 1, m.ids_restore);
  return m;
}

TokenMask random_mask(int64_t batch, int64_t tokens, double ratio, at::Device device,
                      std::optional<at::Generator> gen) {
  MD_CHECK(ratio >= 0 && ratio < 1, "mask ratio must be in [0, 1), got {}", ratio);
  auto noise = at::rand({batch, tokens}, gen, at::TensorOptions().device(device));
  return mask_from_noise(noise, static_cast<int64_t>(tokens * (1.0 - ratio)));
}

Tensor mask_out_tokens(const Tensor& x, const Tensor& ids_keep) {
  return at::gather(x, 1, ids_keep.unsqueeze(-1).expand({-1, -1, x.size(2)}));
}

Tensor unmask_tokens(const Tensor& x, const Tensor& ids_restore, const Tensor& mask_token) {
  const int64_t B = x.size(0), K = x.size(1), T = ids_restore.size(1), e = x.size(2);
  auto filler = mask_token.to(x.dtype()).expand({B, T - K, e});
  auto full = at::cat({x, filler}, 1);  // (B, T, e), kept tokens first
  return at::gather(full, 1, ids_restore.unsqueeze(-1).expand({-1, -1, e}));
}

}  // namespace microdit
