#include "model/microdit.h"

#include <torch/nn/init.h>

#include "core/error.h"
#include "model/recompute.h"

namespace microdit {

CaptionProjectionImpl::CaptionProjectionImpl(int64_t in, int64_t dim, double eps) {
  y_proj = register_module("y_proj", Mlp(in, dim, dim, eps));
}

static torch::nn::Sequential width_map(int64_t in, int64_t out, const ModelConfig& c) {
  return torch::nn::Sequential(LayerNorm(in, c.norm_eps), make_linear(in, out, c.use_bias));
}

MicroDiTImpl::MicroDiTImpl(const ModelConfig& config) : cfg(config) {
  cfg.validate();
  const int64_t D = cfg.dim, Dm = cfg.patch_mixer_dim;
  x_embedder = register_module("x_embedder", PatchEmbed(cfg.in_channels, D, cfg.patch_size));
  t_embedder = register_module("t_embedder", TimestepEmbedder(D));
  pos_embed = register_buffer(
      "pos_embed", sincos_pos_embed_2d(D, cfg.grid(), cfg.grid(), cfg.pos_interp_scale).unsqueeze(0));
  y_embedder = register_module("y_embedder", CaptionProjection(cfg.caption_channels, D, cfg.norm_eps));
  y_emb_preprocess = register_module("y_emb_preprocess", CaptionRefiner(cfg));
  pooled_y_emb_process = register_module("pooled_y_emb_process", Mlp(D, D, D, cfg.norm_eps));

  patch_mixer = register_module("patch_mixer", torch::nn::ModuleList());
  for (const auto& spec : mixer_blocks(cfg)) patch_mixer->push_back(DiTBlock(spec, D, cfg));
  if (Dm != D) {
    patch_mixer_map_xin = register_module("patch_mixer_map_xin", width_map(D, Dm, cfg));
    patch_mixer_map_xout = register_module("patch_mixer_map_xout", width_map(Dm, D, cfg));
    patch_mixer_map_y = register_module("patch_mixer_map_y", width_map(D, Dm, cfg));
  }
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (const auto& spec : backbone_blocks(cfg)) blocks->push_back(DiTBlock(spec, D, cfg));

  mask_token = register_buffer("mask_token", torch::zeros({1, 1, cfg.patch_dim()}));
  final_layer = register_module("final_layer", FinalLayer(D, cfg.patch_dim(), cfg.norm_eps));
  initialize_weights();
}

void MicroDiTImpl::check_inputs(const Tensor& x, const Tensor& t, const Tensor& y) const {
  check_image(x, t);
  const bool ok4 = y.dim() == 4 && y.size(1) == 1;
  MD_CHECK((ok4 || y.dim() == 3) && y.size(0) == x.size(0) && y.size(-1) == cfg.caption_channels,
           "caption must be (B, 1, L, {}) or (B, L, {}) with B = {}, got {}", cfg.caption_channels,
           cfg.caption_channels, x.size(0), fmt::format("{}", fmt::join(y.sizes(), "x")));
}

void MicroDiTImpl::check_image(const Tensor& x, const Tensor& t) const {
  MD_CHECK(x.dim() == 4 && x.size(1) == cfg.in_channels && x.size(2) == cfg.input_size &&
               x.size(3) == cfg.input_size,
           "model input must be (B, {}, {}, {}), got {}", cfg.in_channels, cfg.input_size,
           cfg.input_size, fmt::format("{}", fmt::join(x.sizes(), "x")));
  MD_CHECK(t.dim() == 1 && (t.size(0) == x.size(0) || t.size(0) == 1),
           "noise input t must be (B,) or (1,), got {}", fmt::format("{}", fmt::join(t.sizes(), "x")));
}

CaptionContext MicroDiTImpl::encode_caption(const Tensor& y_in, bool with_null) {
  auto y = y_in.dim() == 4 ? y_in.squeeze(1) : y_in;           // (B, L, Cc)
  if (with_null) y = torch::cat({y, torch::zeros_like(y)});     // (2B, L, Cc)
  CaptionContext ctx;
  ctx.y = y_emb_preprocess(y_embedder(y));                     // (B, L, D)
  ctx.pooled = pooled_y_emb_process(ctx.y.mean(-2));           // (B, D)
  auto y_mixer = patch_mixer_map_y ? patch_mixer_map_y->forward(ctx.y) : ctx.y;  // (B, L, Dm)
  auto cross = [](torch::nn::ModuleList& list) {
    std::vector<CrossAttentionImpl*> layers;
    for (const auto& m : *list) layers.push_back(m->as<DiTBlockImpl>()->cross_attn.get());
    return layers;
  };
  ctx.mixer_kv = caption_kvs(cross(patch_mixer), y_mixer);  // one product for all mixer blocks
  ctx.block_kv = caption_kvs(cross(blocks), ctx.y);         // and one for the backbone's
  return ctx;
}

Tensor MicroDiTImpl::forward(const Tensor& x_img, const Tensor& t_in, const CaptionContext& y,
                             const TokenMask* mask) {
  check_image(x_img, t_in);
  const int64_t B = x_img.size(0);
  MD_CHECK(y.batch() == B, "the encoded caption has batch {}, the input {}", y.batch(), B);
  // pos_embed first: the sum then takes its contiguous layout rather than the patch embedding's
  // transposed one, which every kernel after it would copy.
  auto x = pos_embed + x_embedder(x_img);  // (B, T, D)
  auto c = t_embedder(t_in.expand({B})) + y.pooled;  // (B, D)

  const bool grad = torch::GradMode::is_enabled(), recompute = recompute_blocks && grad;
  const auto mod = grad ? std::vector<std::vector<Tensor>>() : modulations(c);
  const size_t n_mixer = patch_mixer->size();
  auto block = [&](DiTBlockImpl& b, const Tensor& in, const CaptionKV& kv, size_t i) {
    if (!grad) return b.forward_modulated(in, kv, mod[i]);
    return recompute ? recompute_block(b, in, kv, c) : b.forward(in, kv, c);
  };
  if (patch_mixer_map_xin) x = patch_mixer_map_xin->forward(x);          // (B, T, Dm)
  for (size_t i = 0; i < n_mixer; ++i) x = block(*patch_mixer[i]->as<DiTBlockImpl>(), x, y.mixer_kv[i], i);

  if (mask) x = mask_out_tokens(x, mask->ids_keep);                      // (B, K, Dm)
  if (patch_mixer_map_xout) x = patch_mixer_map_xout->forward(x);        // (B, K, D)
  for (size_t i = 0; i < blocks->size(); ++i)
    x = block(*blocks[i]->as<DiTBlockImpl>(), x, y.block_kv[i], n_mixer + i);

  x = grad ? final_layer(x, c) : final_layer->forward_modulated(x, mod.back());  // (B, K, p*p*C)
  if (mask) x = unmask_tokens(x, mask->ids_restore, mask_token);         // (B, T, p*p*C)
  return unpatchify(x);
}

std::vector<std::vector<Tensor>> MicroDiTImpl::modulations(const Tensor& c) {
  std::vector<torch::nn::LinearImpl*> lin;  // each adaLN's Linear (after its GELU-tanh)
  std::vector<int64_t> parts;
  auto add = [&](const torch::nn::Sequential& s, int64_t n) {
    lin.push_back(s->ptr(1)->as<torch::nn::LinearImpl>());
    parts.push_back(n);
  };
  for (const auto& m : *patch_mixer) add(m->as<DiTBlockImpl>()->adaLN_modulation, 6);
  for (const auto& m : *blocks) add(m->as<DiTBlockImpl>()->adaLN_modulation, 6);
  add(final_layer->adaLN_modulation, 2);
  std::vector<std::pair<const void*, uint32_t>> key;
  for (auto* l : lin)
    for (const Tensor* t : {&l->weight, &l->bias}) key.emplace_back(t->data_ptr(), t->_version());
  Tensor W, bias;
  {
    const std::lock_guard<std::mutex> lock(adaln_->mutex);
    if (key != adaln_->key) {  // new or changed weights: concatenate them again
      std::vector<Tensor> w, b;
      for (auto* l : lin) w.push_back(l->weight), b.push_back(l->bias);
      adaln_->w = at::cat(w);
      adaln_->b = at::cat(b);
      adaln_->key = std::move(key);
    }
    W = adaln_->w, bias = adaln_->b;
  }
  const Tensor m = microdit::linear(at::gelu(c, "tanh"), W, bias);  // (B, sum)
  std::vector<std::vector<Tensor>> out;
  int64_t at_col = 0;
  for (size_t i = 0; i < lin.size(); ++i) {
    const int64_t width = lin[i]->weight.size(0);
    out.push_back(modulation_chunks(m.narrow(1, at_col, width), parts[i]));
    at_col += width;
  }
  return out;
}

Tensor MicroDiTImpl::forward_cfg(const Tensor& x, const Tensor& t, const CaptionContext& y, double w) {
  const int64_t B = x.size(0);
  auto out = forward(torch::cat({x, x}), t.size(0) == 1 ? t : torch::cat({t, t}), y);
  auto cond = out.narrow(0, 0, B), uncond = out.narrow(0, B, B);
  return uncond + w * (cond - uncond);
}

Tensor MicroDiTImpl::unpatchify(const Tensor& x) const {
  const int64_t B = x.size(0), p = cfg.patch_size, C = cfg.in_channels, g = cfg.grid();
  return x.reshape({B, g, g, p, p, C})
      .permute({0, 5, 1, 3, 2, 4})  // (B, C, h, p, w, q)
      .reshape({B, C, g * p, g * p});
}

void MicroDiTImpl::set_resolution(int input_size, double pos_interp_scale) {
  ModelConfig next = cfg;
  next.input_size = input_size;
  next.pos_interp_scale = pos_interp_scale;
  next.validate();
  cfg = next;
  torch::NoGradGuard no_grad;
  auto table = sincos_pos_embed_2d(cfg.dim, cfg.grid(), cfg.grid(), cfg.pos_interp_scale);
  pos_embed.set_(table.unsqueeze(0).to(pos_embed.device(), pos_embed.dtype()));
}

// ---- the reference's initialisation --------------------------------------------------

static void trunc_normal(Tensor& w, double std) {
  w.normal_(0.0, std).clamp_(-2.0, 2.0);  // torch's trunc_normal_ bounds are absolute (+-2)
}

void MicroDiTImpl::initialize_weights() {
  torch::NoGradGuard no_grad;
  namespace init = torch::nn::init;
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* lin = m->as<torch::nn::LinearImpl>()) {
      init::xavier_uniform_(lin->weight);
      if (lin->bias.defined()) lin->bias.zero_();
    }
  }
  auto w = x_embedder->proj->weight;
  init::xavier_uniform_(w.view({w.size(0), -1}));
  auto lin = [](const torch::nn::Sequential& s, size_t i) {
    return s->ptr(i)->as<torch::nn::LinearImpl>();
  };
  t_embedder->mlp[0]->as<torch::nn::LinearImpl>()->weight.normal_(0, 0.02);
  lin(t_embedder->mlp, 2)->weight.normal_(0, 0.02);
  pooled_y_emb_process->fc1->weight.normal_(0, 0.02);
  pooled_y_emb_process->fc2->weight.normal_(0, 0.02);
  y_embedder->y_proj->fc1->weight.normal_(0, 0.02);
  y_embedder->y_proj->fc2->weight.normal_(0, 0.02);

  auto init_block = [&](DiTBlockImpl& b, double std) {
    trunc_normal(b.attn->qkv->weight, 0.02);
    trunc_normal(b.attn->proj->weight, std);
    trunc_normal(b.cross_attn->q_linear->weight, 0.02);
    trunc_normal(b.cross_attn->kv_linear->weight, 0.02);
    trunc_normal(b.cross_attn->proj->weight, std);
    if (b.spec.moe) {
      trunc_normal(b.mlp_moe->gate->weight, 0.02);
      trunc_normal(b.mlp_moe->w1, 0.02);
      trunc_normal(b.mlp_moe->w2, std);
    } else {
      trunc_normal(b.mlp_dense->w1->weight, 0.02);
      trunc_normal(b.mlp_dense->w2->weight, std);
      trunc_normal(b.mlp_dense->w3->weight, std);
    }
    lin(b.adaLN_modulation, 1)->weight.zero_();
  };
  const double depth = cfg.depth;
  for (size_t i = 0; i < blocks->size(); ++i)  // depth_init: 0.02 / sqrt(2 (i+1))
    init_block(*blocks[i]->as<DiTBlockImpl>(), 0.02 / std::sqrt(2.0 * (i + 1)));
  for (size_t i = 0; i < patch_mixer->size(); ++i)  // mixer: 0.02 / sqrt(2 depth)
    init_block(*patch_mixer[i]->as<DiTBlockImpl>(), 0.02 / std::sqrt(2.0 * depth));

  trunc_normal(y_emb_preprocess->attn->qkv->weight, 0.02);
  y_emb_preprocess->attn->proj->weight.zero_();
  trunc_normal(y_emb_preprocess->mlp->w1->weight, 0.02);
  trunc_normal(y_emb_preprocess->mlp->w2->weight, 0.02);
  y_emb_preprocess->mlp->w3->weight.zero_();

  lin(final_layer->adaLN_modulation, 1)->weight.zero_();
  final_layer->linear->weight.zero_();
}

}  // namespace microdit
