// The SDXL VAE (diffusers AutoencoderKL): structure at full size, checkpoint namings, and
// parity with diffusers on the small random model of tests/data/vae_* (tools/make_vae_fixtures.py).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>

#include "core/fs.h"
#include "data/image.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "test_util.h"
#include "vae/autoencoder_kl.h"

using microdit::test_util::TempDir;

namespace microdit {
namespace {

using test_util::error_of;

const std::string kData = std::string(microdit::test_util::source_dir()) + "/tests/data/";

int64_t count_params(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

TEST(VaeStructure, SdxlNamesShapesAndCounts) {
  torch::manual_seed(0);
  AutoencoderKL vae(VAEConfig::sdxl());
  const auto params = vae->named_parameters();
  EXPECT_EQ(params.size(), 248u);
  EXPECT_EQ(count_params(*vae), 83653863);
  int64_t enc = 0;
  for (const auto& p : params)
    if (p.key().rfind("encoder.", 0) == 0 || p.key().rfind("quant_conv.", 0) == 0) enc += p.value().numel();
  EXPECT_EQ(enc, 34163664);
  auto shape = [&](const std::string& k) { return params[k].sizes().vec(); };
  using V = std::vector<int64_t>;
  EXPECT_EQ(shape("encoder.conv_in.weight"), (V{128, 3, 3, 3}));
  EXPECT_EQ(shape("encoder.conv_out.weight"), (V{8, 512, 3, 3}));
  EXPECT_EQ(shape("encoder.down_blocks.1.resnets.0.conv_shortcut.weight"), (V{256, 128, 1, 1}));
  EXPECT_EQ(shape("encoder.down_blocks.2.resnets.0.conv_shortcut.weight"), (V{512, 256, 1, 1}));
  EXPECT_EQ(shape("decoder.up_blocks.2.resnets.0.conv_shortcut.weight"), (V{256, 512, 1, 1}));
  EXPECT_EQ(shape("decoder.up_blocks.3.resnets.0.conv_shortcut.weight"), (V{128, 256, 1, 1}));
  EXPECT_EQ(shape("encoder.down_blocks.2.downsamplers.0.conv.weight"), (V{512, 512, 3, 3}));
  EXPECT_EQ(shape("decoder.up_blocks.2.upsamplers.0.conv.weight"), (V{256, 256, 3, 3}));
  EXPECT_EQ(shape("decoder.up_blocks.0.resnets.2.conv2.weight"), (V{512, 512, 3, 3}));
  EXPECT_EQ(shape("decoder.mid_block.attentions.0.to_out.0.weight"), (V{512, 512}));
  EXPECT_EQ(shape("encoder.mid_block.attentions.0.group_norm.bias"), (V{512}));
  EXPECT_EQ(shape("decoder.conv_in.weight"), (V{512, 4, 3, 3}));
  EXPECT_EQ(shape("decoder.conv_out.weight"), (V{3, 128, 3, 3}));
  EXPECT_EQ(shape("quant_conv.weight"), (V{8, 8, 1, 1}));
  EXPECT_EQ(shape("post_quant_conv.weight"), (V{4, 4, 1, 1}));
  EXPECT_FALSE(params.contains("encoder.down_blocks.3.downsamplers.0.conv.weight"));
  EXPECT_FALSE(params.contains("decoder.up_blocks.3.upsamplers.0.conv.weight"));
  EXPECT_FALSE(params.contains("encoder.down_blocks.0.resnets.0.conv_shortcut.weight"));

  vae->eval();
  auto x = torch::rand({1, 3, 64, 64}) * 2 - 1;
  auto post = vae->encode(x);
  EXPECT_EQ(post.mean.sizes().vec(), (V{1, 4, 8, 8}));
  EXPECT_EQ(post.logvar.sizes().vec(), (V{1, 4, 8, 8}));
  auto y = vae->decode(post.mode());
  EXPECT_EQ(y.sizes().vec(), (V{1, 3, 64, 64}));
  EXPECT_TRUE(torch::isfinite(y).all().item<bool>());
}

TEST(VaeStructure, NonSquareAndOddSizes) {
  VAEConfig c;
  c.block_out_channels = {8, 16, 32, 32};
  c.norm_num_groups = 8;
  AutoencoderKL vae(c);
  EXPECT_EQ(count_params(*vae), 334383);
  auto post = vae->encode(torch::randn({2, 3, 48, 40}));
  EXPECT_EQ(post.mean.sizes().vec(), (std::vector<int64_t>{2, 4, 6, 5}));
  EXPECT_EQ(vae->decode(post.mean).sizes().vec(), (std::vector<int64_t>{2, 3, 48, 40}));
  // diffusers' right/bottom padding: H -> floor((H - 2) / 2) + 1 per level.
  EXPECT_EQ(vae->encode(torch::randn({1, 3, 66, 45})).mean.sizes().vec(), (std::vector<int64_t>{1, 4, 8, 5}));
}

TEST(VaeStructure, PhaseUpsampleEqualsUpsampleThenConv) {
  torch::manual_seed(3);
  vae::Upsample up(6);
  torch::NoGradGuard no_grad;
  for (auto cl : {false, true}) {
    auto x = torch::randn({2, 6, 5, 7});
    if (cl) {
      x = x.contiguous(at::MemoryFormat::ChannelsLast);
      up->conv->weight.set_data(up->conv->weight.contiguous(at::MemoryFormat::ChannelsLast));
    }
    const auto fast = up->forward(x), ref = up->forward_reference(x);
    EXPECT_EQ(fast.sizes().vec(), (std::vector<int64_t>{2, 6, 10, 14}));
    EXPECT_EQ(fast.is_contiguous(at::MemoryFormat::ChannelsLast), cl);
    EXPECT_LT((fast - ref).abs().max().item<double>(), 1e-5);
  }
  // A weight change after the first call is picked up (the merged taps are cached).
  const auto x = torch::randn({1, 6, 4, 4});
  up->conv->weight.mul_(-2);
  EXPECT_LT((up->forward(x) - up->forward_reference(x)).abs().max().item<double>(), 1e-5);
  up->conv->bias.add_(1);
  EXPECT_LT((up->forward(x) - up->forward_reference(x)).abs().max().item<double>(), 1e-5);
}

TEST(VaeConfig, JsonFieldsAndErrors) {
  auto c = VAEConfig::from_json_text(
      R"({"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "latent_channels": 16,
          "norm_num_groups": 8, "scaling_factor": 0.5, "shift_factor": null, "act_fn": "silu",
          "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "use_quant_conv": false,
          "latents_mean": null, "force_upcast": true, "sample_size": 1024})",
      "cfg.json");
  EXPECT_EQ(c.block_out_channels, (std::vector<int64_t>{8, 16}));
  EXPECT_EQ(c.latent_channels, 16);
  EXPECT_EQ(c.scaling_factor, 0.5);
  EXPECT_EQ(c.shift_factor, 0.0);
  EXPECT_FALSE(c.use_quant_conv);
  EXPECT_TRUE(c.use_post_quant_conv);
  AutoencoderKL vae(c);
  EXPECT_FALSE(vae->named_parameters().contains("quant_conv.weight"));
  EXPECT_EQ(vae->encode(torch::randn({1, 3, 16, 16})).mean.sizes().vec(), (std::vector<int64_t>{1, 16, 8, 8}));

  EXPECT_EQ(error_of([] { VAEConfig::from_json_text("{\"latent_channels\": \"4\"}", "c.json"); }),
            "c.json: field 'latent_channels' must be an integer, got \"4\"");
  EXPECT_EQ(error_of([] { VAEConfig::from_json_text("{\"act_fn\": \"gelu\"}", "c.json"); }),
            "c.json: act_fn \"gelu\" is not supported (only \"silu\")");
  EXPECT_EQ(error_of([] { VAEConfig::from_json_text("{\"_class_name\": \"UNet2DConditionModel\"}", "c.json"); }),
            "c.json: _class_name is \"UNet2DConditionModel\", expected \"AutoencoderKL\"");
  EXPECT_NE(error_of([] { VAEConfig::from_json_text("{\"norm_num_groups\": 7}", "c.json"); })
                .find("not a positive multiple of norm_num_groups 7"),
            std::string::npos);
  EXPECT_NE(error_of([] { VAEConfig::from_json_text("{oops", "c.json"); }).find("c.json: not valid JSON"),
            std::string::npos);
  EXPECT_NE(error_of([] { VAEConfig::from_json_file("/nonexistent/config.json"); }).find("VAE config not found"),
            std::string::npos);
}

TEST(VaePosterior, SampleModeAndScaling) {
  Posterior p{torch::full({1, 2, 2, 2}, 1.0), torch::full({1, 2, 2, 2}, std::log(4.0))};
  auto eps = torch::full({1, 2, 2, 2}, 0.5);
  EXPECT_TRUE(torch::allclose(p.sample_with_noise(eps), torch::full({1, 2, 2, 2}, 2.0)));
  auto g1 = at::make_generator<at::CPUGeneratorImpl>(7), g2 = at::make_generator<at::CPUGeneratorImpl>(7);
  EXPECT_TRUE(torch::equal(p.sample(g1), p.sample(g2)));
  EXPECT_TRUE(torch::equal(p.mode(), p.mean));
  VAEConfig c;
  auto z = torch::randn({1, 4, 3, 3});
  EXPECT_TRUE(torch::allclose(scale_latents(z, c), z * 0.13025));
  EXPECT_TRUE(torch::allclose(unscale_latents(scale_latents(z, c), c), z, 1e-6, 1e-6));
  c.shift_factor = 0.1159;
  EXPECT_TRUE(torch::allclose(scale_latents(z, c), (z - 0.1159) * 0.13025));
  auto imgs = vae_output_to_images(torch::tensor({-2.0f, -1.0f, 0.0f, 0.5f, 1.0f, 3.0f}).view({1, 3, 1, 2}));
  ASSERT_EQ(imgs.size(), 1u);
  const std::vector<uint8_t> want{0, 128, 255, 0, 191, 255};  // (R,G,B) of pixel 0 then pixel 1
  EXPECT_EQ(imgs[0].pixels, want);
}

// ---- loading: namings, dtypes, errors ---------------------------------------------------------

std::map<std::string, at::Tensor> weights_of(AutoencoderKL& vae) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : vae->named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

TEST(VaeLoad, EveryNamingGivesIdenticalTensors) {
  const std::string dir = kData + "vae_names";
  auto ref_vae = load_vae(dir, c10::kCPU);  // diffusers folder: config.json + diffusion_pytorch_model
  EXPECT_EQ(ref_vae->config().block_out_channels, (std::vector<int64_t>{4, 8, 12}));
  EXPECT_EQ(ref_vae->config().layers_per_block, 1);
  const auto ref = weights_of(ref_vae);
  // The same tensors straight from the file, by diffusers name.
  const auto file = read_safetensors(dir + "/diffusion_pytorch_model.safetensors");
  ASSERT_EQ(file.tensors.size(), ref.size());
  for (const auto& [k, t] : file.tensors) EXPECT_TRUE(torch::equal(ref.at(k), t)) << k;
  for (const char* name : {"ldm.safetensors", "sgm_full.safetensors", "old_attention.safetensors"}) {
    auto vae = load_vae(dir + "/" + name, c10::kCPU);  // config.json beside the file
    const auto got = weights_of(vae);
    ASSERT_EQ(got.size(), ref.size()) << name;
    for (const auto& [k, t] : ref) EXPECT_TRUE(torch::equal(got.at(k), t)) << name << ": " << k;
  }
  // LDM without the prefix, mapped without loading: the attention projections lose their 1x1.
  const auto mapped = vae_state_dict_to_diffusers(read_safetensors(dir + "/ldm.safetensors").tensors, 3);
  std::map<std::string, at::Tensor> m(mapped.begin(), mapped.end());
  EXPECT_EQ(m.at("decoder.mid_block.attentions.0.to_out.0.weight").dim(), 2);
  EXPECT_TRUE(torch::equal(m.at("decoder.up_blocks.0.resnets.0.conv1.weight"),
                           ref.at("decoder.up_blocks.0.resnets.0.conv1.weight")));
}

TEST(VaeLoad, HalfPrecisionFilesAndDtypes) {
  const std::string dir = kData + "vae_names";
  auto fp32 = load_vae(dir, c10::kCPU);
  const auto ref = weights_of(fp32);
  for (auto [file, st] : {std::pair{"fp16.safetensors", at::kHalf}, std::pair{"bf16.safetensors", at::kBFloat16}}) {
    auto vae = load_vae(dir + "/" + file, c10::kCPU);  // converted to float32
    EXPECT_EQ(vae->dtype(), at::kFloat);
    for (const auto& [k, t] : weights_of(vae)) EXPECT_TRUE(torch::equal(t, ref.at(k).to(st).to(at::kFloat))) << k;
  }
  auto bf = load_vae(dir, c10::kCPU, at::kBFloat16);
  EXPECT_EQ(bf->dtype(), at::kBFloat16);
  for (const auto& p : bf->parameters()) EXPECT_EQ(p.scalar_type(), at::kBFloat16);
  // Inputs in float32 are cast to the weights' dtype; outputs come in it.
  auto post = bf->encode(torch::rand({1, 3, 16, 24}) * 2 - 1);
  EXPECT_EQ(post.mean.scalar_type(), at::kBFloat16);
  EXPECT_EQ(bf->decode(post.mean).sizes().vec(), (std::vector<int64_t>{1, 3, 16, 24}));
}

TEST(VaeLoad, FolderVariantsAndErrors) {
  const std::string dir = kData + "vae_names";
  TempDir tmp;
  auto sd = read_safetensors(dir + "/diffusion_pytorch_model.safetensors").tensors;
  std::system(("cp '" + dir + "/config.json' '" + tmp.path + "/config.json'").c_str());
  // A folder holding only the .fp16 variant; a pipeline folder with a vae/ subfolder.
  NamedTensors half;
  for (const auto& [k, t] : sd) half.emplace_back(k, t.to(at::kHalf));
  write_safetensors(tmp.path + "/diffusion_pytorch_model.fp16.safetensors", half);
  EXPECT_EQ(resolve_vae_files(tmp.path).first, tmp.path + "/diffusion_pytorch_model.fp16.safetensors");
  EXPECT_EQ(load_vae(tmp.path, c10::kCPU)->config().block_out_channels.size(), 3u);
  make_dirs(tmp.path + "/pipe/vae");
  std::system(("cp '" + dir + "/config.json' '" + dir + "/diffusion_pytorch_model.safetensors' '" + tmp.path +
               "/pipe/vae/'").c_str());
  EXPECT_EQ(resolve_vae_files(tmp.path + "/pipe").second, tmp.path + "/pipe/vae/config.json");

  auto write_variant = [&](const std::string& name, const std::function<void(NamedTensors&)>& edit) {
    NamedTensors t = sd;
    edit(t);
    write_safetensors(tmp.path + "/" + name, t);
    return tmp.path + "/" + name;
  };
  const auto missing = write_variant("missing.safetensors", [](NamedTensors& t) {
    std::erase_if(t, [](const auto& kv) { return kv.first == "decoder.conv_out.bias"; });
  });
  EXPECT_EQ(error_of([&] { load_vae(missing, c10::kCPU); }),
            missing + ": missing tensor 'decoder.conv_out.bias' (shape [3])");
  const auto extra = write_variant("extra.safetensors", [](NamedTensors& t) {
    t.emplace_back("decoder.up_blocks.0.upsamplers.1.conv.weight", torch::zeros({2}));
  });
  EXPECT_NE(error_of([&] { load_vae(extra, c10::kCPU); })
                .find(extra + ": unexpected tensor 'decoder.up_blocks.0.upsamplers.1.conv.weight'"),
            std::string::npos);
  const auto bad_shape = write_variant("shape.safetensors", [](NamedTensors& t) {
    for (auto& [k, v] : t)
      if (k == "encoder.conv_in.weight") v = torch::zeros({4, 3, 5, 5});
  });
  EXPECT_EQ(error_of([&] { load_vae(bad_shape, c10::kCPU); }),
            bad_shape + ": tensor 'encoder.conv_in.weight' has shape [4, 3, 5, 5], expected [4, 3, 3, 3]");
  const auto bad_dtype = write_variant("dtype.safetensors", [](NamedTensors& t) {
    for (auto& [k, v] : t)
      if (k == "quant_conv.bias") v = torch::zeros({8}, at::kLong);
  });
  EXPECT_EQ(error_of([&] { load_vae(bad_dtype, c10::kCPU); }),
            bad_dtype + ": tensor 'quant_conv.bias' has dtype Long, expected a floating-point type");
  // LDM names in errors: the file's name and the diffusers one.
  NamedTensors ldm = read_safetensors(dir + "/ldm.safetensors").tensors;
  for (auto& [k, v] : ldm)
    if (k == "decoder.up.0.block.0.nin_shortcut.weight") v = torch::zeros({4, 7, 1, 1});
  write_safetensors(tmp.path + "/ldm_bad.safetensors", ldm);
  EXPECT_EQ(error_of([&] { load_vae(tmp.path + "/ldm_bad.safetensors", c10::kCPU); }),
            tmp.path + "/ldm_bad.safetensors: tensor 'decoder.up.0.block.0.nin_shortcut.weight' (as "
                       "'decoder.up_blocks.2.resnets.0.conv_shortcut.weight') has shape [4, 7, 1, 1], expected "
                       "[4, 8, 1, 1]");
  // A single file without config.json beside it: SDXL assumed, and said so.
  make_dirs(tmp.path + "/single");
  write_safetensors(tmp.path + "/single/vae.safetensors", sd);
  EXPECT_NE(error_of([&] { load_vae(tmp.path + "/single/vae.safetensors", c10::kCPU); })
                .find("(SDXL config assumed: no config.json beside it)"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { load_vae("/nonexistent/vae.safetensors", c10::kCPU); }),
            "VAE weights not found: /nonexistent/vae.safetensors");
  EXPECT_NE(error_of([&] { load_vae(tmp.path + "/single", c10::kCPU); }).find("no diffusion_pytorch_model"),
            std::string::npos);
}

// ---- parity with diffusers 0.42.1 (tools/make_vae_fixtures.py small) ---------------------------

TEST(VaeParity, SmallRandomModelMatchesDiffusers) {
  auto vae = load_vae(kData + "vae_small", c10::kCPU);
  const auto v = read_safetensors(kData + "vae_small_vectors.safetensors");
  const auto post = vae->encode(v.at("x"));
  auto max_err = [](const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); };
  EXPECT_LT(max_err(post.mean, v.at("mean")), 1e-5);
  EXPECT_LT(max_err(post.logvar, v.at("logvar")), 1e-5);
  EXPECT_LT(max_err(post.sample_with_noise(v.at("eps")), v.at("sample")), 1e-5);
  const auto dec = vae->decode(v.at("z"));
  EXPECT_LT(max_err(dec, v.at("decoded")), 1e-5);
  // load_vae's CPU fast path (channels-last, phase upsampling) and diffusers' own order of work.
  EXPECT_TRUE(vae->channels_last());
  vae->set_channels_last(false);
  vae->set_phase_upsample(false);
  EXPECT_LT(max_err(vae->encode(v.at("x")).mean, v.at("mean")), 1e-5);
  EXPECT_LT(max_err(vae->decode(v.at("z")), v.at("decoded")), 1e-5);
  // The comparison is not vacuous: the outputs are far from zero and from each other.
  EXPECT_GT(v.at("decoded").abs().max().item<double>(), 1.0);
  EXPECT_GT(max_err(post.mean, post.logvar), 0.1);
}

}  // namespace
}  // namespace microdit
