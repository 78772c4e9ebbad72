#include "eval/inception.h"

#include <ATen/ATen.h>

#include <map>

#include "core/error.h"
#include "core/fs.h"
#include "eval/torch_legacy.h"
#include "io/checkpoint.h"

namespace microdit {

namespace nn = torch::nn;

BasicConv2dImpl::BasicConv2dImpl(int64_t in, int64_t out, std::vector<int64_t> kernel,
                                 std::vector<int64_t> stride, std::vector<int64_t> padding) {
  conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(in, out, kernel).stride(stride).padding(padding).bias(false)));
  bn = register_module("bn", nn::BatchNorm2d(nn::BatchNorm2dOptions(out).eps(0.001)));
}

Tensor BasicConv2dImpl::forward(const Tensor& x) { return at::relu(bn(conv(x))); }

namespace {

Tensor avg_pool_3x3(const Tensor& x) {  // count_include_pad=False, as the TF graph
  return at::avg_pool2d(x, {3, 3}, {1, 1}, {1, 1}, false, /*count_include_pad=*/false);
}
Tensor max_pool_3x3_s2(const Tensor& x) { return at::max_pool2d(x, {3, 3}, {2, 2}); }

struct Mixed : InceptionMixed {
  BasicConv2d conv(const std::string& name, int64_t in, int64_t out, std::vector<int64_t> k,
                   std::vector<int64_t> stride = {1, 1}, std::vector<int64_t> pad = {0, 0}) {
    return register_module(name, BasicConv2d(in, out, std::move(k), std::move(stride), std::move(pad)));
  }
};

// FIDInceptionA (Mixed_5b/c/d).
struct InceptionA : Mixed {
  InceptionA(int64_t in, int64_t pool_features) {
    b1 = conv("branch1x1", in, 64, {1, 1});
    b5_1 = conv("branch5x5_1", in, 48, {1, 1});
    b5_2 = conv("branch5x5_2", 48, 64, {5, 5}, {1, 1}, {2, 2});
    d1 = conv("branch3x3dbl_1", in, 64, {1, 1});
    d2 = conv("branch3x3dbl_2", 64, 96, {3, 3}, {1, 1}, {1, 1});
    d3 = conv("branch3x3dbl_3", 96, 96, {3, 3}, {1, 1}, {1, 1});
    pool = conv("branch_pool", in, pool_features, {1, 1});
  }
  Tensor forward(const Tensor& x) override {
    return at::cat({b1(x), b5_2(b5_1(x)), d3(d2(d1(x))), pool(avg_pool_3x3(x))}, 1);
  }
  BasicConv2d b1{nullptr}, b5_1{nullptr}, b5_2{nullptr}, d1{nullptr}, d2{nullptr}, d3{nullptr}, pool{nullptr};
};

// InceptionB (Mixed_6a): 35x35 -> 17x17.
struct InceptionB : Mixed {
  explicit InceptionB(int64_t in) {
    b3 = conv("branch3x3", in, 384, {3, 3}, {2, 2});
    d1 = conv("branch3x3dbl_1", in, 64, {1, 1});
    d2 = conv("branch3x3dbl_2", 64, 96, {3, 3}, {1, 1}, {1, 1});
    d3 = conv("branch3x3dbl_3", 96, 96, {3, 3}, {2, 2});
  }
  Tensor forward(const Tensor& x) override {
    return at::cat({b3(x), d3(d2(d1(x))), max_pool_3x3_s2(x)}, 1);
  }
  BasicConv2d b3{nullptr}, d1{nullptr}, d2{nullptr}, d3{nullptr};
};

// FIDInceptionC (Mixed_6b..6e): factorised 7x7 convolutions.
struct InceptionC : Mixed {
  InceptionC(int64_t in, int64_t c7) {
    b1 = conv("branch1x1", in, 192, {1, 1});
    s1 = conv("branch7x7_1", in, c7, {1, 1});
    s2 = conv("branch7x7_2", c7, c7, {1, 7}, {1, 1}, {0, 3});
    s3 = conv("branch7x7_3", c7, 192, {7, 1}, {1, 1}, {3, 0});
    d1 = conv("branch7x7dbl_1", in, c7, {1, 1});
    d2 = conv("branch7x7dbl_2", c7, c7, {7, 1}, {1, 1}, {3, 0});
    d3 = conv("branch7x7dbl_3", c7, c7, {1, 7}, {1, 1}, {0, 3});
    d4 = conv("branch7x7dbl_4", c7, c7, {7, 1}, {1, 1}, {3, 0});
    d5 = conv("branch7x7dbl_5", c7, 192, {1, 7}, {1, 1}, {0, 3});
    pool = conv("branch_pool", in, 192, {1, 1});
  }
  Tensor forward(const Tensor& x) override {
    return at::cat({b1(x), s3(s2(s1(x))), d5(d4(d3(d2(d1(x))))), pool(avg_pool_3x3(x))}, 1);
  }
  BasicConv2d b1{nullptr}, s1{nullptr}, s2{nullptr}, s3{nullptr}, d1{nullptr}, d2{nullptr}, d3{nullptr},
      d4{nullptr}, d5{nullptr}, pool{nullptr};
};

// InceptionD (Mixed_7a): 17x17 -> 8x8.
struct InceptionD : Mixed {
  explicit InceptionD(int64_t in) {
    a1 = conv("branch3x3_1", in, 192, {1, 1});
    a2 = conv("branch3x3_2", 192, 320, {3, 3}, {2, 2});
    b1 = conv("branch7x7x3_1", in, 192, {1, 1});
    b2 = conv("branch7x7x3_2", 192, 192, {1, 7}, {1, 1}, {0, 3});
    b3 = conv("branch7x7x3_3", 192, 192, {7, 1}, {1, 1}, {3, 0});
    b4 = conv("branch7x7x3_4", 192, 192, {3, 3}, {2, 2});
  }
  Tensor forward(const Tensor& x) override {
    return at::cat({a2(a1(x)), b4(b3(b2(b1(x)))), max_pool_3x3_s2(x)}, 1);
  }
  BasicConv2d a1{nullptr}, a2{nullptr}, b1{nullptr}, b2{nullptr}, b3{nullptr}, b4{nullptr};
};

// FIDInceptionE_1 (Mixed_7b, average pool without padding) and FIDInceptionE_2 (Mixed_7c,
// max pool: a bug of the TF graph kept for FID).
struct InceptionE : Mixed {
  InceptionE(int64_t in, bool max_pool) : max_pool(max_pool) {
    b1 = conv("branch1x1", in, 320, {1, 1});
    t1 = conv("branch3x3_1", in, 384, {1, 1});
    t2a = conv("branch3x3_2a", 384, 384, {1, 3}, {1, 1}, {0, 1});
    t2b = conv("branch3x3_2b", 384, 384, {3, 1}, {1, 1}, {1, 0});
    d1 = conv("branch3x3dbl_1", in, 448, {1, 1});
    d2 = conv("branch3x3dbl_2", 448, 384, {3, 3}, {1, 1}, {1, 1});
    d3a = conv("branch3x3dbl_3a", 384, 384, {1, 3}, {1, 1}, {0, 1});
    d3b = conv("branch3x3dbl_3b", 384, 384, {3, 1}, {1, 1}, {1, 0});
    pool = conv("branch_pool", in, 192, {1, 1});
  }
  Tensor forward(const Tensor& x) override {
    auto t = t1(x);
    auto d = d2(d1(x));
    auto p = max_pool ? at::max_pool2d(x, {3, 3}, {1, 1}, {1, 1}) : avg_pool_3x3(x);
    return at::cat({b1(x), t2a(t), t2b(t), d3a(d), d3b(d), pool(p)}, 1);
  }
  bool max_pool;
  BasicConv2d b1{nullptr}, t1{nullptr}, t2a{nullptr}, t2b{nullptr}, d1{nullptr}, d2{nullptr}, d3a{nullptr},
      d3b{nullptr}, pool{nullptr};
};

const char* const kMixedNames[] = {"Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                                   "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"};

}  // namespace

FIDInceptionV3Impl::FIDInceptionV3Impl() {
  Conv2d_1a_3x3 = register_module("Conv2d_1a_3x3", BasicConv2d(3, 32, std::vector<int64_t>{3, 3}, std::vector<int64_t>{2, 2}));
  Conv2d_2a_3x3 = register_module("Conv2d_2a_3x3", BasicConv2d(32, 32, std::vector<int64_t>{3, 3}));
  Conv2d_2b_3x3 = register_module("Conv2d_2b_3x3", BasicConv2d(32, 64, std::vector<int64_t>{3, 3}, std::vector<int64_t>{1, 1}, std::vector<int64_t>{1, 1}));
  Conv2d_3b_1x1 = register_module("Conv2d_3b_1x1", BasicConv2d(64, 80, std::vector<int64_t>{1, 1}));
  Conv2d_4a_3x3 = register_module("Conv2d_4a_3x3", BasicConv2d(80, 192, std::vector<int64_t>{3, 3}));
  std::vector<std::shared_ptr<InceptionMixed>> m = {
      std::make_shared<InceptionA>(192, 32),  std::make_shared<InceptionA>(256, 64),
      std::make_shared<InceptionA>(288, 64),  std::make_shared<InceptionB>(288),
      std::make_shared<InceptionC>(768, 128), std::make_shared<InceptionC>(768, 160),
      std::make_shared<InceptionC>(768, 160), std::make_shared<InceptionC>(768, 192),
      std::make_shared<InceptionD>(768),      std::make_shared<InceptionE>(1280, false),
      std::make_shared<InceptionE>(2048, true)};
  for (size_t i = 0; i < m.size(); ++i) mixed.push_back(register_module(kMixedNames[i], m[i]));
}

Tensor FIDInceptionV3Impl::forward_normalized(const Tensor& x0) {
  auto x = Conv2d_2b_3x3(Conv2d_2a_3x3(Conv2d_1a_3x3(x0)));
  x = max_pool_3x3_s2(x);                         // (B, 64, 73, 73)
  x = max_pool_3x3_s2(Conv2d_4a_3x3(Conv2d_3b_1x1(x)));  // (B, 192, 35, 35)
  for (auto& m : mixed) x = m->forward(x);        // (B, 2048, 8, 8)
  return x.mean({2, 3});                          // AdaptiveAvgPool2d(1) -> (B, 2048)
}

Tensor FIDInceptionV3Impl::forward(const Tensor& images01) {
  MD_CHECK(images01.dim() == 4 && images01.size(1) == 3, "Inception input must be (B, 3, H, W), got {}",
           images01.sizes());
  auto x = at::upsample_bilinear2d(images01.to(at::kFloat), {kInceptionSize, kInceptionSize}, false);
  return forward_normalized(2 * x - 1);
}

NamedTensors fid_inception_state_dict(const NamedTensors& tensors, const std::string& source) {
  static const std::map<std::string, std::string> blocks = {
      {"blocks.0.0.", "Conv2d_1a_3x3."}, {"blocks.0.1.", "Conv2d_2a_3x3."}, {"blocks.0.2.", "Conv2d_2b_3x3."},
      {"blocks.1.0.", "Conv2d_3b_1x1."}, {"blocks.1.1.", "Conv2d_4a_3x3."}, {"blocks.2.0.", "Mixed_5b."},
      {"blocks.2.1.", "Mixed_5c."},      {"blocks.2.2.", "Mixed_5d."},      {"blocks.2.3.", "Mixed_6a."},
      {"blocks.2.4.", "Mixed_6b."},      {"blocks.2.5.", "Mixed_6c."},      {"blocks.2.6.", "Mixed_6d."},
      {"blocks.2.7.", "Mixed_6e."},      {"blocks.3.0.", "Mixed_7a."},      {"blocks.3.1.", "Mixed_7b."},
      {"blocks.3.2.", "Mixed_7c."}};
  NamedTensors out;
  for (const auto& [k0, t] : tensors) {
    std::string k = k0.rfind("module.", 0) == 0 ? k0.substr(7) : k0;
    if (k.rfind("blocks.", 0) == 0) {
      const auto d = k.find('.', k.find('.', 7) + 1);
      const auto it = blocks.find(k.substr(0, d + 1));
      if (it == blocks.end()) continue;
      k = it->second + k.substr(d + 1);
    }
    if (k.rfind("fc.", 0) == 0 || k.rfind("AuxLogits.", 0) == 0) continue;
    out.emplace_back(k, t);
  }
  bool ok = false;
  for (const auto& [k, t] : out) ok |= k == "Mixed_7c.branch_pool.conv.weight";
  MD_CHECK(ok, "{}: not an FID Inception-v3 weight file (no Mixed_7c.branch_pool.conv.weight or "
           "blocks.3.2.branch_pool.conv.weight)", source);
  return out;
}

FIDInceptionV3 load_fid_inception(const std::string& path, c10::Device device) {
  MD_CHECK(is_regular_file(path), "{}: no such file", path);
  auto tensors = fid_inception_state_dict(
      is_legacy_torch_file(path) ? read_legacy_torch(path) : read_checkpoint(path, ""), path);
  FIDInceptionV3 net;
  LoadOptions lo;
  lo.allow_missing = {"*num_batches_tracked"};
  lo.allow_unexpected = {"*num_batches_tracked"};
  load_state_dict(*net, tensors, lo, path);
  net->eval();
  net->to(device);
  return net;
}

}  // namespace microdit
