#include "model/attention.h"

#include <ATen/autocast_mode.h>
#include <torch/nn/functional/linear.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <atomic>
#include <cmath>

#include "core/choice.h"
#include "core/error.h"
#include "kernels/attention_cpu.h"
#include "model/fused.h"

namespace microdit {

namespace {
std::atomic<CpuAttention> g_cpu_attention{CpuAttention::automatic};

double attention_scale(const Tensor& q) { return 1.0 / std::sqrt(static_cast<double>(q.size(-1))); }

// microdit's CPU attention kernels (kernels/attention_cpu.h) in q's dtype: bf16 (AMX or
// AVX512-BF16) or float32 (AVX-512). q (B, H, N, hd), k and v (B, H, L, hd); returns the output
// (B, H, N, hd) and lse (B, H, N), which only a pass for gradients computes (the output's bits are
// the same either way).
std::tuple<Tensor, Tensor> cpu_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 bool with_lse = true) {
  RECORD_FUNCTION(q.scalar_type() == at::kBFloat16 ? "microdit::attention_forward_bf16" : "microdit::attention_forward_f32",
                  std::vector<c10::IValue>({q, k, v}));
  return q.scalar_type() == at::kBFloat16
             ? kernels::cpu::attention_forward_bf16(q, k, v, attention_scale(q), with_lse)
             : kernels::cpu::attention_forward_f32(q, k, v, attention_scale(q), with_lse);
}

// Both passes microdit's, for gradients.
struct CpuAttentionFn : torch::autograd::Function<CpuAttentionFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v) {
    auto [o, lse] = cpu_attention_forward(q, k, v);  // lse (B, H, N) float32
    ctx->save_for_backward({q, k, v, o, lse});
    return o;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &q = s[0], &k = s[1], &v = s[2], &o = s[3], &lse = s[4];
    Tensor dout = grads[0].to(q.scalar_type());
    if (dout.stride(3) != 1) dout = dout.contiguous();
    const bool bf16 = q.scalar_type() == at::kBFloat16;
    RECORD_FUNCTION(bf16 ? "microdit::attention_backward_bf16" : "microdit::attention_backward_f32",
                    std::vector<c10::IValue>({q, k, v}));
    auto [dq, dk, dv] = bf16 ? kernels::cpu::attention_backward_bf16(q, k, v, o, lse, dout, attention_scale(q))
                             : kernels::cpu::attention_backward_f32(q, k, v, o, lse, dout, attention_scale(q));
    return {dq, dk, dv};
  }
};

// The output (B, H, N, hd) of microdit's kernels, with gradients where the inputs need them; the
// same forward kernel either way, so a checkpointed block's recomputation gives the same bits.
Tensor cpu_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const bool grads = torch::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  return grads ? CpuAttentionFn::apply(q, k, v) : std::get<0>(cpu_attention_forward(q, k, v, /*with_lse=*/false));
}
}  // namespace

void set_cpu_attention(CpuAttention mode) { g_cpu_attention = mode; }
CpuAttention cpu_attention() { return g_cpu_attention; }

CpuAttention parse_cpu_attention(const std::string& name) {
  return parse_choice<CpuAttention>("--cpu-attention", name,
                                    {{"auto", CpuAttention::automatic},
                                     {"float32", CpuAttention::float32},
                                     {"aten-float32", CpuAttention::aten_float32},
                                     {"bf16", CpuAttention::bf16}});
}

CpuAttentionKernel cpu_attention_kernel(int64_t hd) {
  const auto mode = g_cpu_attention.load();
  const auto f32 = mode != CpuAttention::aten_float32 && kernels::cpu::avx512_attention_available()
                       ? CpuAttentionKernel::float32
                       : CpuAttentionKernel::aten_float32;
  if (!at::autocast::is_autocast_enabled(at::kCPU) || at::autocast::get_autocast_dtype(at::kCPU) != at::kBFloat16)
    return f32;
  switch (mode) {
    case CpuAttention::float32:
    case CpuAttention::aten_float32: return f32;
    case CpuAttention::bf16: return CpuAttentionKernel::aten_bf16;
    case CpuAttention::automatic: break;
  }
  if (!kernels::cpu::bf16_attention_applies(hd)) return f32;
  if (kernels::cpu::amx_attention_available()) return CpuAttentionKernel::amx_bf16;
  return kernels::cpu::avx512_bf16_attention_available() ? CpuAttentionKernel::avx512_bf16 : f32;
}

const char* cpu_attention_kernel_name(CpuAttentionKernel kernel) {
  switch (kernel) {
    case CpuAttentionKernel::aten_bf16: return "bf16 ATen";
    case CpuAttentionKernel::amx_bf16: return "bf16 AMX";
    case CpuAttentionKernel::avx512_bf16: return "bf16 AVX512-BF16";
    case CpuAttentionKernel::aten_float32: return "float32 ATen";
    case CpuAttentionKernel::float32: break;
  }
  return "float32";
}

Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto B = q.size(0), N = q.size(1), H = q.size(2), hd = q.size(3);
  auto heads = [](const Tensor& t) { return t.transpose(1, 2); };  // (B, seq, H, hd) -> (B, H, seq, hd)
  if (q.device().is_cpu()) {
    const bool autocast = at::autocast::is_autocast_enabled(at::kCPU);
    const auto kernel = cpu_attention_kernel(hd);
    if (kernel == CpuAttentionKernel::amx_bf16 || kernel == CpuAttentionKernel::avx512_bf16) {
      // Both passes in bf16 on AMX tiles or in AVX512-BF16 (kernels/attention_cpu.h;
      // docs/performance.md), on the inputs autocast would give ATen's attention.
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
      auto b = [&](const Tensor& t) { return heads(t.to(at::kBFloat16)); };
      return cpu_attention(b(q), b(k), b(v)).transpose(1, 2).reshape({B, N, H * hd});  // bf16
    }
    if (kernel == CpuAttentionKernel::float32 || kernel == CpuAttentionKernel::aten_float32) {
      // Float32 attention: microdit's kernels on AVX-512 CPUs (2-3x ATen's float32 flash kernels
      // on MicroDiT's shapes), else ATen's. Under bf16 autocast on CPUs with neither AMX nor
      // AVX512-BF16 it stays in float32 too: ATen's bf16 attention is the slow one there (its flash kernel's bf16
      // products go through MKL's bf16 GEMM, forward + backward 4-10x slower than float32 on
      // MicroDiT's shapes; docs/performance.md). So attention steps past autocast (which would
      // cast it to bf16) and computes in float32 on the inputs autocast would have given it,
      // rounded to bf16. Under autocast the float32 result goes on to the output projection,
      // which autocast casts as before; without autocast it comes back in q's dtype, as ATen's
      // attention returns it.
      const auto low = at::autocast::get_autocast_dtype(at::kCPU);
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
      auto f = [&](const Tensor& t) { return heads((autocast ? t.to(low) : t).to(at::kFloat)); };
      auto o = kernel == CpuAttentionKernel::float32 ? cpu_attention(f(q), f(k), f(v))
                                                     : at::scaled_dot_product_attention(f(q), f(k), f(v));
      if (!autocast) o = o.to(q.scalar_type());  // (B, H, N, hd)
      return o.transpose(1, 2).reshape({B, N, H * hd});
    }
  }
  auto o = at::scaled_dot_product_attention(heads(q), heads(k), heads(v));  // (B, H, N, hd)
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
  const Tensor p = qkv(x);  // (B, N, 3h) = [q | k | v]
  Tensor q, k, v;           // (B, N, h) each
  if (fused_kernels_enabled() && fused_kernels_apply(p) && torch::GradMode::is_enabled() && p.requires_grad() &&
      ln_q->eps == ln_k->eps && ln_q->low_precision == ln_k->low_precision) {
    // One autograd function for both norms: its backward pass writes dq, dk and dv into one
    // gradient of p (model/fused.h).
    const auto [out, save] = ln_q->fused_dtypes(p);
    std::tie(q, k, v) = fused_qkv_norm(p, ln_q->eps, out, save);
  } else {
    // Without gradients (sampling) the norms write over q and k in the product p, which only
    // this function holds.
    auto parts = p.view({B, N, 3, h}).unbind(2);
    q = ln_q->forward_in_place(parts[0]);
    k = ln_k->forward_in_place(parts[1]);
    v = parts[2];
  }
  return proj(multi_head_attention(q.view({B, N, heads, hd}), k.view({B, N, heads, hd}), v.view({B, N, heads, hd})));
}

CrossAttentionImpl::CrossAttentionImpl(int64_t d, int64_t h, int64_t heads, bool bias, double eps)
    : h(h), heads(heads) {
  q_linear = register_module("q_linear", make_linear(d, h, bias));
  kv_linear = register_module("kv_linear", make_linear(d, 2 * h, bias));
  proj = register_module("proj", make_linear(h, d, bias));
  ln_q = register_module("ln_q", LayerNorm(h, eps, false));
  ln_k = register_module("ln_k", LayerNorm(h, eps, false));
}

CaptionKV CrossAttentionImpl::caption_kv(const Tensor& cond) { return caption_kv_from_product(kv_linear(cond)); }

CaptionKV CrossAttentionImpl::caption_kv_from_product(const Tensor& p) {
  const auto B = p.size(0), L = p.size(1), hd = h / heads;  // p (B, L, 2h) = [k | v]
  Tensor k, v;                                              // (B, L, h) each
  if (fused_kernels_enabled() && fused_kernels_apply(p) && torch::GradMode::is_enabled() && p.requires_grad()) {
    // One autograd function: its backward pass writes dk and dv into one gradient of p.
    const auto [out, save] = ln_k->fused_dtypes(p);
    std::tie(k, v) = fused_kv_norm(p, ln_k->eps, out, save);
  } else {
    auto parts = p.view({B, L, 2, h}).unbind(2);
    k = ln_k(parts[0]);
    // Without gradients (a sampler's encoded caption, read at every step) v gets rows of its
    // own: as a column slice of caption_kvs' product its rows lie n * 2h apart.
    v = at::GradMode::is_enabled() ? parts[1] : parts[1].contiguous();
  }
  return {k.view({B, L, heads, hd}), v.view({B, L, heads, hd})};
}

std::vector<CaptionKV> caption_kvs(const std::vector<CrossAttentionImpl*>& layers, const Tensor& cond) {
  std::vector<CaptionKV> out;
  if (layers.empty()) return out;
  const CrossAttentionImpl& a0 = *layers[0];
  const bool bias = a0.kv_linear->bias.defined();
  bool alike = true;
  for (const auto* a : layers)
    alike = alike && a->h == a0.h && a->heads == a0.heads && a->kv_linear->bias.defined() == bias &&
            a->ln_k->eps == a0.ln_k->eps && a->ln_k->low_precision == a0.ln_k->low_precision;
  if (layers.size() == 1 || !alike) {
    for (auto* a : layers) out.push_back(a->caption_kv(cond));
    return out;
  }
  const auto n = static_cast<int64_t>(layers.size()), B = cond.size(0), L = cond.size(1), hd = a0.h / a0.heads;
  std::vector<Tensor> w, b;
  for (auto* a : layers) {
    w.push_back(a->kv_linear->weight);  // (2h, d): the bf16 copy inside a Bf16Weights scope
    if (bias) b.push_back(a->kv_linear->bias);
  }
  const Tensor p = microdit::linear(cond, at::cat(w), bias ? at::cat(b) : Tensor());  // (B, L, n*2h)
  if (fused_kernels_enabled() && fused_kernels_apply(p) && torch::GradMode::is_enabled() && p.requires_grad()) {
    const auto [o, save] = a0.ln_k->fused_dtypes(p);
    const auto kv = fused_kv_norms(p, n, a0.ln_k->eps, o, save);  // LN(k0), v0, LN(k1), v1, ...
    for (int64_t i = 0; i < n; ++i)
      out.push_back({kv[2 * i].view({B, L, a0.heads, hd}), kv[2 * i + 1].view({B, L, a0.heads, hd})});
    return out;
  }
  const auto parts = p.split(2 * a0.h, -1);  // n x (B, L, 2h), views
  for (int64_t i = 0; i < n; ++i) out.push_back(layers[i]->caption_kv_from_product(parts[i]));
  return out;
}

Tensor CrossAttentionImpl::forward(const Tensor& x, const CaptionKV& kv) {
  const auto B = x.size(0), N = x.size(1), hd = h / heads;
  auto q = ln_q->forward_in_place(q_linear(x)).view({B, N, heads, hd});  // over the product, in sampling
  return proj(multi_head_attention(q, kv.k, kv.v));
}

}  // namespace microdit
