#include "model/attention.h"

#include <ATen/ops/scaled_dot_product_attention.h>

namespace microdit {

Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto B = q.size(0), N = q.size(1), H = q.size(2), hd = q.size(3);
  auto o = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                            v.transpose(1, 2));  // (B, H, N, hd)
  return o.transpose(1, 2).reshape({B, N, H * hd});
}

SelfAttentionImpl::SelfAttentionImpl(int64_t d, int64_t h, int64_t heads, bool bias, double eps)
    : h(h), heads(heads) {
  qkv = register_module("qkv", make_linear(d, 3 * h, bias));
  proj = register_module("proj", make_linear(h, d, bias));
  ln_q = register_module("ln_q", LayerNorm(h, eps, /*affine=*/false));
  ln_k = register_module("ln_k", LayerNorm(h, eps, /*affine=*/false));
}

Tensor SelfAttentionImpl::forward(const Tensor& x) {
  const auto B = x.size(0), N = x.size(1), hd = h / heads;
  auto parts = qkv(x).view({B, N, 3, h}).unbind(2);  // 3 x (B, N, h)
  auto q = ln_q(parts[0]).view({B, N, heads, hd});
  auto k = ln_k(parts[1]).view({B, N, heads, hd});
  auto v = parts[2].view({B, N, heads, hd});
  return proj(multi_head_attention(q, k, v));
}

CrossAttentionImpl::CrossAttentionImpl(int64_t d, int64_t h, int64_t heads, bool bias, double eps)
    : h(h), heads(heads) {
  q_linear = register_module("q_linear", make_linear(d, h, bias));
  kv_linear = register_module("kv_linear", make_linear(d, 2 * h, bias));
  proj = register_module("proj", make_linear(h, d, bias));
  ln_q = register_module("ln_q", LayerNorm(h, eps, false));
  ln_k = register_module("ln_k", LayerNorm(h, eps, false));
}

CaptionKV CrossAttentionImpl::caption_kv(const Tensor& cond) {
  const auto B = cond.size(0), L = cond.size(1), hd = h / heads;
  auto kv = kv_linear(cond).view({B, L, 2, h}).unbind(2);  // 2 x (B, L, h)
  return {ln_k(kv[0]).view({B, L, heads, hd}), kv[1].view({B, L, heads, hd})};
}

Tensor CrossAttentionImpl::forward(const Tensor& x, const CaptionKV& kv) {
  const auto B = x.size(0), N = x.size(1), hd = h / heads;
  auto q = ln_q(q_linear(x)).view({B, N, heads, hd});
  return proj(multi_head_attention(q, kv.k, kv.v));
}

}  // namespace microdit
