// Deferred masking (MICRODIT.md section 4): which tokens survive into the backbone.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>

#include <optional>

namespace microdit {

using at::Tensor;

struct TokenMask {
  Tensor ids_keep;     // (B, K) int64, indices of kept tokens in shuffled order
  Tensor ids_restore;  // (B, T) int64, inverse permutation of the shuffle
  Tensor mask;         // (B, T) float, 1 = removed, 0 = kept (original order)
};

// From per-sample noise (B, T): ids_shuffle = argsort(noise), keep the first `keep`.
TokenMask mask_from_noise(const Tensor& noise, int64_t keep);
// Uniform noise from `gen` (may be nullopt for the default generator); keep int(T*(1-ratio)).
TokenMask random_mask(int64_t batch, int64_t tokens, double ratio, at::Device device,
                      std::optional<at::Generator> gen = std::nullopt);
// (B, T, d) -> (B, K, d): the kept tokens, in ids_keep order.
Tensor mask_out_tokens(const Tensor& x, const Tensor& ids_keep);
// (B, K, e) -> (B, T, e): append T-K copies of mask_token (1, 1, e), then restore order.
Tensor unmask_tokens(const Tensor& x, const Tensor& ids_restore, const Tensor& mask_token);

}  // namespace microdit
