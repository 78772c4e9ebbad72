// The reference's precomputed latent MDS (DATA_PATH.md 2.3) as a training set. One or more
// dataset folders (as the reference's configs list them) are read as one dataset; sample i
// gives the stage's latent column `latents_<image_size>` (C, S/8, S/8) and `caption_latents`
// (L, W), both float16, exactly as stored (latents already times the VAE scaling factor).
//
// Folders written by `microdit prepare` also hold microdit.json ({encoder, scaling_factor,
// latent_channels, caption_shape, sizes}); the reference's folders do not, and then the text
// encoder and scaling factor come from the training config (SDXL's 0.13025 by default).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "data/mds.h"
#include "data/shards.h"

namespace microdit {

// What microdit.json beside a prepared MDS says (empty / 0 when there is none).
struct LatentDatasetInfo {
  std::string encoder;        // text encoder spec the captions were embedded with
  double scaling_factor = 0;  // VAE scaling factor the latents are multiplied by
  std::string vae;            // description of the VAE (informational)
};
LatentDatasetInfo read_latent_dataset_info(const std::string& dir);

class LatentMDSSource : public SampleSource {
 public:
  // caption_width: the model's caption_channels (caption_latents hold L * width float16 values).
  LatentMDSSource(std::vector<std::string> dirs, int image_size, int64_t caption_width);
  int64_t size() const override { return data_->size(); }
  // images (n, C, h, w) float16, captions (n, L, W) float16, rows in `ids` order.
  void gather(const std::vector<int64_t>& ids, Tensor& images, Tensor& captions) const override;

  const std::vector<int64_t>& image_shape() const { return image_shape_; }      // C, h, w
  const std::vector<int64_t>& caption_shape() const { return caption_shape_; }  // L, W
  const std::string& column() const { return column_; }  // latents_<image_size>
  const LatentDatasetInfo& info() const { return info_; }  // from the first folder
  std::string caption(int64_t i) const;  // the `caption` string column ("" when absent)

 private:
  std::unique_ptr<MDSDataset> data_;
  std::string column_;
  int image_size_;
  int64_t caption_width_;
  std::vector<int64_t> image_shape_, caption_shape_;
  LatentDatasetInfo info_;
};

}  // namespace microdit
