// The Inception-v3 that FID is defined with: pytorch-fid's InceptionV3 over its
// fid_inception_v3() (the TensorFlow graph pt_inception-2015-12-05 ported to PyTorch), up to
// the 2048-d global average pool ("pool3"). Its quirks against torchvision's Inception3: the
// FIDInceptionA/C/E_1 average pools exclude padding (count_include_pad=False) and
// FIDInceptionE_2 (Mixed_7c) pools its branch with a 3x3 max pool. Preprocessing as
// pytorch-fid: images in [0, 1], bilinear resize to 299x299 (align_corners=False, no
// antialias), then 2x - 1.
//
// Registered names are torchvision's (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.
// running_mean, ...), those of the released .pth; pytorch-fid's InceptionV3 state dict
// (blocks.0.0.conv.weight, ...) is renamed on loading.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>

#include "io/safetensors.h"

namespace microdit {

using torch::Tensor;

// Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU.
struct BasicConv2dImpl : torch::nn::Module {
  BasicConv2dImpl(int64_t in, int64_t out, std::vector<int64_t> kernel, std::vector<int64_t> stride = {1, 1},
                  std::vector<int64_t> padding = {0, 0});
  Tensor forward(const Tensor& x);
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
};
TORCH_MODULE(BasicConv2d);

// Mixed_5b ... Mixed_7c: parallel branches concatenated along channels.
struct InceptionMixed : torch::nn::Module {
  virtual Tensor forward(const Tensor& x) = 0;
};

struct FIDInceptionV3Impl : torch::nn::Module {
  FIDInceptionV3Impl();
  // (B, 3, H, W) float in [0, 1] -> (B, 2048) pool3 features (float32).
  Tensor forward(const Tensor& images01);
  // The network after preprocessing: (B, 3, 299, 299) in [-1, 1] -> (B, 2048).
  Tensor forward_normalized(const Tensor& x);
  std::vector<std::shared_ptr<InceptionMixed>> mixed;  // Mixed_5b ... Mixed_7c
  BasicConv2d Conv2d_1a_3x3{nullptr}, Conv2d_2a_3x3{nullptr}, Conv2d_2b_3x3{nullptr},
      Conv2d_3b_1x1{nullptr}, Conv2d_4a_3x3{nullptr};
};
TORCH_MODULE(FIDInceptionV3);

inline constexpr int64_t kInceptionDims = 2048;
inline constexpr int64_t kInceptionSize = 299;

// The network's tensors from a checkpoint: torchvision names kept, pytorch-fid InceptionV3
// names (blocks.i.j.*) renamed, the classifier (fc.*) and AuxLogits.* dropped. Throws a
// one-line Error when `tensors` is not an FID Inception-v3 state dict.
NamedTensors fid_inception_state_dict(const NamedTensors& tensors, const std::string& source);

// Reads a .pth (torch.save zip, or the legacy pre-1.6 format of the released file) or a
// .safetensors weight file and returns the network in
// eval mode on `device` (float32).
FIDInceptionV3 load_fid_inception(const std::string& path, c10::Device device = c10::kCPU);

}  // namespace microdit
