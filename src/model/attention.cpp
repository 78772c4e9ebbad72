#include "model/attention.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace microdit {

Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto B = q.size(0), N = q.size(1), H = q.size(2), hd = q.size(3);
  const bool autocast = q.device().is_cpu() && at::autocast::is_autocast_enabled(at::kCPU);
  if (q.device().is_cpu() && (autocast || q.scalar_type() != at::kFloat ||
                              k.scalar_type() != at::kFloat || v.scalar_type() != at::kFloat)) {
    // On the CPU, ATen's bf16 attention is the slow one: without AMX its flash kernel's bf16
    // products go through MKL's bf16 GEMM, and forward + backward ran 4-10x slower than in
    // float32 on MicroDiT's shapes (docs/performance.md). So here attention steps past autocast
    // (which would cast it to bf16) and computes in float32 on the inputs autocast would have
    // given it, rounded to bf16 (under autocast q, k and v arrive in bf16 already). Under
    // autocast the float32 result goes on to the output projection, which autocast casts as
    // before; without autocast it comes back in q's dtype, as ATen's attention returns it.
    const auto low = at::autocast::get_autocast_dtype(at::kCPU);
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
    auto f = [&](const Tensor& t) { return (autocast ? t.to(low) : t).to(at::kFloat).transpose(1, 2); };
    auto o = at::scaled_dot_product_attention(f(q), f(k), f(v));  // (B, H, N, hd) float32
    if (!autocast) o = o.to(q.scalar_type());
    return o.transpose(1, 2).reshape({B, N, H * hd});
  }
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
