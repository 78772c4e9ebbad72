#include "text/bert.h"

#include <nlohmann/json.hpp>

#include <fstream>

#include "core/error.h"

namespace microdit::text {

namespace nn = torch::nn;

void BertConfig::validate() const {
  MD_CHECK(vocab_size > 0 && hidden_size > 0 && num_hidden_layers > 0 && intermediate_size > 0 &&
               max_position_embeddings > 0 && type_vocab_size > 0,
           "BERT config: sizes must be positive");
  MD_CHECK(num_attention_heads > 0 && hidden_size % num_attention_heads == 0,
           "BERT config: hidden_size {} is not divisible by num_attention_heads {}", hidden_size,
           num_attention_heads);
}

BertConfig bert_config_from_json(const std::string& path) {
  std::ifstream f(path);
  MD_CHECK(f, "BERT config not found: {}", path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail("BERT config {}: {}", path, e.what());
  }
  BertConfig c;
  auto get = [&](const char* k, auto& v) {
    if (j.contains(k)) v = j[k].get<std::decay_t<decltype(v)>>();
  };
  get("vocab_size", c.vocab_size);
  get("hidden_size", c.hidden_size);
  get("num_hidden_layers", c.num_hidden_layers);
  get("num_attention_heads", c.num_attention_heads);
  get("intermediate_size", c.intermediate_size);
  get("max_position_embeddings", c.max_position_embeddings);
  get("type_vocab_size", c.type_vocab_size);
  get("layer_norm_eps", c.layer_norm_eps);
  if (j.contains("hidden_act"))
    MD_CHECK(j["hidden_act"] == "gelu", "BERT config {}: hidden_act {} is not supported (gelu)",
             path, j["hidden_act"].dump());
  c.validate();
  return c;
}

namespace {
nn::LayerNorm layer_norm(int64_t d, double eps) {
  return nn::LayerNorm(nn::LayerNormOptions({d}).eps(eps));
}
}  // namespace

BertEmbeddingsImpl::BertEmbeddingsImpl(const BertConfig& c) {
  word_embeddings = register_module("word_embeddings", nn::Embedding(c.vocab_size, c.hidden_size));
  position_embeddings = register_module(
      "position_embeddings", nn::Embedding(c.max_position_embeddings, c.hidden_size));
  token_type_embeddings =
      register_module("token_type_embeddings", nn::Embedding(c.type_vocab_size, c.hidden_size));
  LayerNorm = register_module("LayerNorm", layer_norm(c.hidden_size, c.layer_norm_eps));
}

Tensor BertEmbeddingsImpl::forward(const Tensor& ids) {
  const int64_t L = ids.size(1);
  MD_CHECK(L <= position_embeddings->weight.size(0),
           "text length {} exceeds the BERT model's {} positions", L,
           position_embeddings->weight.size(0));
  auto x = word_embeddings(ids) + position_embeddings->weight.slice(0, 0, L).unsqueeze(0) +
           token_type_embeddings->weight[0];  // token_type_ids are all 0
  return LayerNorm(x);
}

BertSelfAttentionImpl::BertSelfAttentionImpl(const BertConfig& c) : heads(c.num_attention_heads) {
  query = register_module("query", Linear(c.hidden_size, c.hidden_size));
  key = register_module("key", Linear(c.hidden_size, c.hidden_size));
  value = register_module("value", Linear(c.hidden_size, c.hidden_size));
}

Tensor BertSelfAttentionImpl::forward(const Tensor& x, const Tensor& keep) {
  const int64_t B = x.size(0), L = x.size(1), W = x.size(2);
  auto split = [&](const Tensor& t) { return t.view({B, L, heads, W / heads}).transpose(1, 2); };
  auto o = at::scaled_dot_product_attention(split(query(x)), split(key(x)), split(value(x)), keep);
  return o.transpose(1, 2).reshape({B, L, W});  // (B, H, L, hd) -> (B, L, W)
}

BertResidualOutputImpl::BertResidualOutputImpl(int64_t in, int64_t out, double eps) {
  dense = register_module("dense", Linear(in, out));
  LayerNorm = register_module("LayerNorm", layer_norm(out, eps));
}

Tensor BertResidualOutputImpl::forward(const Tensor& x, const Tensor& residual) {
  return LayerNorm(dense(x) + residual);
}

BertAttentionImpl::BertAttentionImpl(const BertConfig& c) {
  self = register_module("self", BertSelfAttention(c));
  output = register_module("output",
                           BertResidualOutput(c.hidden_size, c.hidden_size, c.layer_norm_eps));
}

Tensor BertAttentionImpl::forward(const Tensor& x, const Tensor& keep) {
  return output(self(x, keep), x);
}

BertIntermediateImpl::BertIntermediateImpl(const BertConfig& c) {
  dense = register_module("dense", Linear(c.hidden_size, c.intermediate_size));
}

Tensor BertIntermediateImpl::forward(const Tensor& x) { return at::gelu(dense(x)); }

BertLayerImpl::BertLayerImpl(const BertConfig& c) {
  attention = register_module("attention", BertAttention(c));
  intermediate = register_module("intermediate", BertIntermediate(c));
  output = register_module("output", BertResidualOutput(c.intermediate_size, c.hidden_size,
                                                        c.layer_norm_eps));
}

Tensor BertLayerImpl::forward(const Tensor& x, const Tensor& keep) {
  auto a = attention(x, keep);
  return output(intermediate(a), a);
}

BertModelImpl::BertModelImpl(const BertConfig& c) : config(c) {
  c.validate();
  embeddings = register_module("embeddings", BertEmbeddings(c));
  layer = nn::ModuleList();
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layer->push_back(BertLayer(c));
  encoder = register_module("encoder", std::make_shared<nn::Module>());
  encoder->register_module("layer", layer);
}

Tensor BertModelImpl::forward(const Tensor& ids, const Tensor& attention_mask) {
  auto keep = attention_mask.to(at::kBool).view({ids.size(0), 1, 1, ids.size(1)});
  auto x = embeddings(ids);
  for (const auto& l : *layer) x = l->as<BertLayer>()->forward(x, keep);
  return x;
}

}  // namespace microdit::text
