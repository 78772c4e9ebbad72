// BERT encoder (Hugging Face BertModel without the pooler): word + position + token-type
// embeddings and LayerNorm, then post-LN layers (self-attention with a padding mask, GELU MLP).
// Registered names match BertModel's state dict ("embeddings.word_embeddings.weight",
// "encoder.layer.0.attention.self.query.weight", ...).
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <string>

#include "core/linear.h"

namespace microdit::text {

using torch::Tensor;

struct BertConfig {
  int64_t vocab_size = 30522, hidden_size = 384, num_hidden_layers = 6,
          num_attention_heads = 12, intermediate_size = 1536, max_position_embeddings = 512,
          type_vocab_size = 2;
  double layer_norm_eps = 1e-12;
  void validate() const;
};
// Reads a Hugging Face config.json (BERT fields; others ignored).
BertConfig bert_config_from_json(const std::string& path);

struct BertEmbeddingsImpl : torch::nn::Module {
  explicit BertEmbeddingsImpl(const BertConfig& c);
  Tensor forward(const Tensor& ids);  // (B, L) int64 -> (B, L, W)
  torch::nn::Embedding word_embeddings{nullptr}, position_embeddings{nullptr},
      token_type_embeddings{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
};
TORCH_MODULE(BertEmbeddings);

struct BertSelfAttentionImpl : torch::nn::Module {
  explicit BertSelfAttentionImpl(const BertConfig& c);
  // x (B, L, W), keep (B, 1, 1, L) bool: true where the key is a real token.
  Tensor forward(const Tensor& x, const Tensor& keep);
  int64_t heads;
  Linear query{nullptr}, key{nullptr}, value{nullptr};
};
TORCH_MODULE(BertSelfAttention);

// dense -> dropout (none at inference) -> LayerNorm(x + residual)
struct BertResidualOutputImpl : torch::nn::Module {
  BertResidualOutputImpl(int64_t in, int64_t out, double eps);
  Tensor forward(const Tensor& x, const Tensor& residual);
  Linear dense{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
};
TORCH_MODULE(BertResidualOutput);

struct BertAttentionImpl : torch::nn::Module {
  explicit BertAttentionImpl(const BertConfig& c);
  Tensor forward(const Tensor& x, const Tensor& keep);
  BertSelfAttention self{nullptr};
  BertResidualOutput output{nullptr};
};
TORCH_MODULE(BertAttention);

struct BertIntermediateImpl : torch::nn::Module {
  explicit BertIntermediateImpl(const BertConfig& c);
  Tensor forward(const Tensor& x);  // dense then exact (erf) GELU
  Linear dense{nullptr};
};
TORCH_MODULE(BertIntermediate);

struct BertLayerImpl : torch::nn::Module {
  explicit BertLayerImpl(const BertConfig& c);
  Tensor forward(const Tensor& x, const Tensor& keep);
  BertAttention attention{nullptr};
  BertIntermediate intermediate{nullptr};
  BertResidualOutput output{nullptr};
};
TORCH_MODULE(BertLayer);

struct BertModelImpl : torch::nn::Module {
  explicit BertModelImpl(const BertConfig& c);
  // ids (B, L) int64, attention_mask (B, L) (1 = token, 0 = padding) -> last hidden (B, L, W).
  Tensor forward(const Tensor& ids, const Tensor& attention_mask);
  BertConfig config;
  BertEmbeddings embeddings{nullptr};
  std::shared_ptr<torch::nn::Module> encoder;  // holds `layer`: "encoder.layer.N." names
  torch::nn::ModuleList layer{nullptr};
};
TORCH_MODULE(BertModel);

}  // namespace microdit::text
