#include "data/latent_source.h"

#include <ATen/ATen.h>

#include <cstring>
#include <fstream>

#include "core/error.h"
#include "core/fs.h"

namespace microdit {

LatentDatasetInfo read_latent_dataset_info(const std::string& dir) {
  LatentDatasetInfo info;
  const std::string path = dir + "/microdit.json";
  if (!is_regular_file(path)) return info;
  std::ifstream in(path);
  auto j = nlohmann::json::parse(in, nullptr, false);
  MD_CHECK(!j.is_discarded() && j.is_object(), "{}: not valid JSON", path);
  try {
    info.encoder = j.value("encoder", std::string());
    info.scaling_factor = j.value("scaling_factor", 0.0);
    info.vae = j.value("vae", std::string());
  } catch (const nlohmann::json::exception&) {
    fail("{}: encoder/vae must be strings and scaling_factor a number", path);
  }
  return info;
}

LatentMDSSource::LatentMDSSource(std::vector<std::string> dirs, int image_size, int64_t caption_width)
    : column_("latents_" + std::to_string(image_size)), image_size_(image_size),
      caption_width_(caption_width) {
  MD_CHECK(!dirs.empty(), "latent MDS: no dataset folder given");
  MD_CHECK(image_size >= 8 && image_size % 8 == 0, "latent MDS: image size {} is not a multiple of 8",
           image_size);
  for (const auto& d : dirs)
    MD_CHECK(is_mds_dir(d), "{}: not an MDS dataset (no index.json of mosaicml-streaming format)", d);
  info_ = read_latent_dataset_info(dirs.front());
  data_ = std::make_unique<MDSDataset>(dirs);
  const std::string where = fmt::format("{}", fmt::join(dirs, ", "));
  MD_CHECK(data_->column_index(column_) >= 0,
           "{}: no column '{}' (the stage's image size {}); columns are {}", where, column_, image_size,
           [&] {
             std::vector<std::string> n;
             for (const auto& c : data_->columns()) n.push_back(c.name);
             return fmt::format("{}", fmt::join(n, ", "));
           }());
  MD_CHECK(data_->column_index("caption_latents") >= 0, "{}: no column 'caption_latents'", where);
  MD_CHECK(data_->size() > 0, "{}: the dataset holds no samples", where);
  // Shapes from sample 0; gather() checks every sample against them.
  auto img = mds::latent_image_tensor(data_->get(0, column_), image_size_, where + " sample 0");
  auto cap = mds::caption_latent_tensor(data_->get(0, "caption_latents"), caption_width_,
                                        where + " sample 0");
  image_shape_ = img.sizes().vec();                   // C, h, w
  caption_shape_ = {cap.size(-2), cap.size(-1)};      // L, W
}

void LatentMDSSource::gather(const std::vector<int64_t>& ids, Tensor& images, Tensor& captions) const {
  const auto n = static_cast<int64_t>(ids.size());
  std::vector<int64_t> ishape{n}, cshape{n};
  ishape.insert(ishape.end(), image_shape_.begin(), image_shape_.end());
  cshape.insert(cshape.end(), caption_shape_.begin(), caption_shape_.end());
  images = at::empty(ishape, at::kHalf);    // (n, C, h, w)
  captions = at::empty(cshape, at::kHalf);  // (n, L, W)
  const size_t ibytes = images[0].numel() * 2, cbytes = captions[0].numel() * 2;
  auto* ip = static_cast<char*>(images.data_ptr());
  auto* cp = static_cast<char*>(captions.data_ptr());
  const int ic = data_->column_index(column_), cc = data_->column_index("caption_latents");
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = ids[r];
    auto raw = data_->get_columns(i, {ic, cc});  // only these two columns' bytes are read
    MD_CHECK(raw[0].size() == ibytes && raw[1].size() == cbytes,
             "{}: sample {} has {} bytes of {} and {} of caption_latents; sample 0 has {} and {}",
             fmt::join(data_->dirs(), ", "), i, raw[0].size(), column_, raw[1].size(), ibytes, cbytes);
    std::memcpy(ip + r * ibytes, raw[0].data(), ibytes);
    std::memcpy(cp + r * cbytes, raw[1].data(), cbytes);
  }
}

std::string LatentMDSSource::caption(int64_t i) const {
  return data_->column_index("caption") >= 0 ? data_->get(i, "caption") : std::string();
}

}  // namespace microdit
