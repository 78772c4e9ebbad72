#include "model/fused.h"

#include <torch/autograd.h>

#include <ATen/record_function.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "kernels/fused.h"

namespace microdit {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

kernels::DType kdt(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::f32;
    case at::kBFloat16: return kernels::DType::bf16;
    case at::kHalf: return kernels::DType::f16;
    default: fail("fused kernels take float32, bf16 or float16 tensors, not {}", c10::toString(t));
  }
}

void* stream_of(const Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

// The kernel for t's device: the CUDA one with the current stream, or the CPU one.
#define MD_KERNEL(t, fn, ...)                                      \
  do {                                                             \
    if ((t).is_cuda()) kernels::fn(__VA_ARGS__, stream_of(t));     \
    else kernels::cpu::fn(__VA_ARGS__);                            \
  } while (0)

// Whether an inference pass may write its result (shaped and typed as `like`) over t, a
// parameter taken by value: t is contiguous, of like's shape and dtype, and this is the only
// handle to it and its memory (the caller passed a temporary or moved its tensor in; a named
// tensor passed in is copied, which makes two). Its lines are in cache, having just been read,
// where a new tensor's are not: in sampling, the residual LayerNorm took 225 us into a new
// tensor and 145 us over its input.
bool scratch_like(const Tensor& t, const Tensor& like) {
  return t.use_count() == 1 && t.storage().use_count() == 1 && t.is_contiguous() && t.sizes() == like.sizes() &&
         t.scalar_type() == like.scalar_type() && t.device() == like.device() && t.storage_offset() == 0 &&
         !t.requires_grad();
}

// The device guard where it is one (CUDAGuard needs a CUDA device).
struct DeviceGuard {
  std::optional<c10::cuda::CUDAGuard> guard;
  explicit DeviceGuard(const Tensor& t) {
    if (t.is_cuda()) guard.emplace(t.device());
  }
};

// Row stride of `x` seen as (rows, d) without a copy, or -1 when it cannot be.
int64_t row_stride(const Tensor& x) {
  if (x.dim() < 2) return x.dim() == 1 ? x.size(0) : -1;
  if (x.stride(-1) != 1) return -1;
  const int64_t ld = x.stride(-2);
  for (int64_t i = 0; i + 2 < x.dim(); ++i)
    if (x.size(i) != 1 && x.stride(i) != x.size(i + 1) * x.stride(i + 1)) return -1;
  return ld;
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// LibTorch's custom functions take no undefined inputs (VariableInfo asks them for a device):
// an absent weight, shift or scale travels as an empty tensor.
Tensor or_empty(const Tensor& t, const Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}
Tensor present(const Tensor& t) { return t.defined() && t.numel() > 0 ? t : Tensor(); }

// The forward and backward passes of the (modulated) LayerNorm, shared by the two autograd
// functions below.
// `key` prefixes its entries in ctx->saved_data; the five tensors the backward pass needs are
// appended to `to_save` (for one save_for_backward call of the whole function).
Tensor modln_forward_pass(AutogradContext* ctx, const std::string& key, const Tensor& x_in, const Tensor& weight_in,
                          const Tensor& shift_in, const Tensor& scale_in, double eps, at::ScalarType out,
                          at::ScalarType save, std::vector<Tensor>& to_save) {
  const DeviceGuard guard(x_in);
  const Tensor weight = present(weight_in), shift = present(shift_in), scale = present(scale_in);
  const bool mod = shift.defined();
  const int64_t d = x_in.size(-1);
  int64_t ld = row_stride(x_in);
  const Tensor x = ld < 0 ? x_in.contiguous() : x_in;
  if (ld < 0) ld = d;
  const int64_t rows = x.numel() / d;
  const int64_t T = mod ? x.size(1) : rows;  // modulation rows r belong to sample r / T
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor w = weight.defined() ? weight.to(at::kFloat).contiguous() : Tensor();
  const Tensor sh = mod ? shift.to(out).contiguous() : Tensor();
  const Tensor sc = mod ? scale.to(out).contiguous() : Tensor();
  auto y = at::empty(x.sizes(), x.options().dtype(out));  // contiguous
  auto mean = at::empty({rows}, f32), rstd = at::empty({rows}, f32);
  const bool copy = save != x.scalar_type();
  const Tensor xs = copy ? at::empty(x.sizes(), x.options().dtype(save)) : x;
  MD_KERNEL(x, modln_forward, x.data_ptr(), ld, kdt(x.scalar_type()), copy ? xs.data_ptr() : nullptr,
            kdt(save), w.defined() ? w.data_ptr<float>() : nullptr, ptr_or_null(sh), ptr_or_null(sc),
            y.data_ptr(), kdt(out), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, T, d,
            static_cast<float>(eps));
  for (const Tensor& t : {xs, or_empty(w, mean), or_empty(sc, mean), mean, rstd}) to_save.push_back(t);
  ctx->saved_data[key + "ld"] = copy ? d : ld;
  ctx->saved_data[key + "T"] = T;
  ctx->saved_data[key + "x_dtype"] = static_cast<int64_t>(x.scalar_type());
  ctx->saved_data[key + "w_dtype"] = static_cast<int64_t>(weight.defined() ? weight.scalar_type() : at::kFloat);
  ctx->saved_data[key + "shift_dtype"] = static_cast<int64_t>(mod ? shift.scalar_type() : at::kFloat);
  ctx->saved_data[key + "scale_dtype"] = static_cast<int64_t>(mod ? scale.scalar_type() : at::kFloat);
  return y;
}

// Gradients (x, weight, shift, scale, then three empty) from dy, for the norm whose saved
// tensors start at saved[first] and whose saved_data entries start with `key`. When dres is
// defined (a gradient of x from elsewhere: the residual stream's), dx includes it, added in the
// kernel. When dx_out is defined, dx is written into it (a strided view with unit column stride
// and rows of equal stride: a third of a q, k, v gradient) and g[0] is that view; the
// gradient needs_input_grad(0) asks for then belongs to the caller.
variable_list modln_backward_pass(AutogradContext* ctx, const std::string& key, const variable_list& saved,
                                  size_t first, const Tensor& dy_in, const Tensor& dres_in,
                                  const Tensor& dx_out = Tensor()) {
  const Tensor xs = saved[first], w = present(saved[first + 1]), sc = present(saved[first + 2]),
               mean = saved[first + 3], rstd = saved[first + 4];
  const DeviceGuard guard(xs);
  const int64_t ld = ctx->saved_data[key + "ld"].toInt(), T = ctx->saved_data[key + "T"].toInt();
  const auto xt = static_cast<at::ScalarType>(ctx->saved_data[key + "x_dtype"].toInt());
  const auto out = sc.defined() ? sc.scalar_type() : dy_in.scalar_type();
  const int64_t d = xs.size(-1), rows = xs.numel() / d, B = rows / T;
  const Tensor dy = dy_in.to(kernel_dtype(out) ? out : at::kFloat).contiguous();
  const auto yt = dy.scalar_type();
  const Tensor scy = sc.defined() ? sc.to(yt) : sc;
  variable_list g(7);
  const bool need_w = w.defined() && !dx_out.defined() && ctx->needs_input_grad(1);
  const bool need_mod = sc.defined() && !dx_out.defined() && (ctx->needs_input_grad(2) || ctx->needs_input_grad(3));
  Tensor s0, s1;  // (B, d) float32: sum_t dy, sum_t dy xhat per sample
  if (need_w || need_mod) {
    s0 = at::zeros({B, d}, mean.options());
    s1 = at::zeros({B, d}, mean.options());
  }
  bool summed = false;
  if (dx_out.defined() || ctx->needs_input_grad(0)) {
    const Tensor dres = dres_in.defined() ? dres_in.to(xt).contiguous() : Tensor();
    int64_t ldx = d;
    if (dx_out.defined()) {
      MD_CHECK(dx_out.scalar_type() == xt && dx_out.numel() == xs.numel() && row_stride(dx_out) >= d,
               "fused LayerNorm: bad gradient buffer");
      g[0] = dx_out;
      ldx = row_stride(dx_out);
    } else {
      g[0] = at::empty(xs.sizes(), xs.options().dtype(xt));
    }
    if (s0.defined() && !xs.is_cuda()) {  // on the CPU dx and the sums in one pass over dy and xs
      kernels::cpu::modln_backward_dx_sums(dy.data_ptr(), kdt(yt), xs.data_ptr(), ld, kdt(xs.scalar_type()),
                                           w.defined() ? w.data_ptr<float>() : nullptr, ptr_or_null(scy),
                                           mean.data_ptr<float>(), rstd.data_ptr<float>(), g[0].data_ptr(), ldx,
                                           kdt(xt), ptr_or_null(dres), s0.data_ptr<float>(), s1.data_ptr<float>(),
                                           B, T, d);
      summed = true;
    } else {
      MD_KERNEL(xs, modln_backward_dx, dy.data_ptr(), kdt(yt), xs.data_ptr(), ld, kdt(xs.scalar_type()),
                w.defined() ? w.data_ptr<float>() : nullptr, ptr_or_null(scy), mean.data_ptr<float>(),
                rstd.data_ptr<float>(), g[0].data_ptr(), ldx, kdt(xt), ptr_or_null(dres), rows, T, d);
    }
  }
  if (need_w || need_mod) {
    if (!summed)
      MD_KERNEL(xs, modln_backward_sums, dy.data_ptr(), kdt(yt), xs.data_ptr(), ld, kdt(xs.scalar_type()),
                mean.data_ptr<float>(), rstd.data_ptr<float>(), s0.data_ptr<float>(), s1.data_ptr<float>(), B,
                T, d);
    auto dt = [&](const char* k) { return static_cast<at::ScalarType>(ctx->saved_data[key + k].toInt()); };
    if (need_w) g[1] = (sc.defined() ? (s1 * (1 + sc.to(at::kFloat))).sum(0) : s1.sum(0)).to(dt("w_dtype"));
    if (sc.defined()) {
      g[2] = s0.to(dt("shift_dtype"));
      g[3] = (w.defined() ? s1 * w : s1).to(dt("scale_dtype"));
    }
  }
  return g;
}

// One norm's forward pass for a function of its own: its tensors saved for the backward pass.
Tensor modln_forward_saved(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& shift,
                           const Tensor& scale, double eps, at::ScalarType out, at::ScalarType save) {
  std::vector<Tensor> to_save;
  Tensor y = modln_forward_pass(ctx, "", x, weight, shift, scale, eps, out, save, to_save);
  ctx->save_for_backward(to_save);
  return y;
}

struct ModulatedLayerNormFn : torch::autograd::Function<ModulatedLayerNormFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& shift,
                        const Tensor& scale, double eps, at::ScalarType out, at::ScalarType save) {
    return modln_forward_saved(ctx, x, weight, shift, scale, eps, out, save);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return modln_backward_pass(ctx, "", ctx->get_saved_variables(), 0, grads[0], Tensor());
  }
};

// The same LayerNorm, also handing x on (as a view, for the residual stream): its backward
// pass receives the gradient of both and adds the residual stream's to dx in the kernel,
// which autograd would otherwise add in a kernel of its own (x feeds both the norm and the
// residual add after it).
struct ResidualLayerNormFn : torch::autograd::Function<ResidualLayerNormFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& shift,
                               const Tensor& scale, double eps, at::ScalarType out, at::ScalarType save) {
    return {x, modln_forward_saved(ctx, x, weight, shift, scale, eps, out, save)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return modln_backward_pass(ctx, "", ctx->get_saved_variables(), 0, grads[1], grads[0]);
  }
};

// p (..., parts * h) cut into `parts` slices of h, in groups of `group` slices whose first
// `normed` ones are normalized (LayerNorms without weight) and the others views of p. The
// self-attention's [q | k | v] (3, 3, 2), the cross-attention's [k | v] (2, 2, 1), and the
// [k | v] of n cross-attentions side by side (2n, 2, 1). The backward pass writes every slice's
// gradient into one gradient of p, which autograd would assemble with a cat of the slices'.
struct SplitNormFn : torch::autograd::Function<SplitNormFn> {
  static bool is_normed(int64_t i, int64_t group, int64_t normed) { return i % group < normed; }
  static variable_list forward(AutogradContext* ctx, const Tensor& p, int64_t parts, int64_t group, int64_t normed,
                               double eps, at::ScalarType out, at::ScalarType save) {
    const int64_t h = p.size(-1) / parts;
    std::vector<Tensor> to_save;
    const Tensor none;
    variable_list r;
    for (int64_t i = 0; i < parts; ++i) {
      const Tensor slice = p.narrow(-1, i * h, h);
      r.push_back(is_normed(i, group, normed) ? modln_forward_pass(ctx, fmt::format("n{}.", i), slice, none, none,
                                                                   none, eps, out, save, to_save)
                                              : slice);
    }
    ctx->save_for_backward(to_save);
    ctx->saved_data["parts"] = parts;
    ctx->saved_data["group"] = group;
    ctx->saved_data["normed"] = normed;
    return r;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t parts = ctx->saved_data["parts"].toInt(), group = ctx->saved_data["group"].toInt(),
                  normed = ctx->saved_data["normed"].toInt();
    const Tensor& x0 = saved[0];
    const int64_t h = x0.size(-1);
    auto sizes = x0.sizes().vec();
    sizes.back() = parts * h;
    Tensor d = at::empty(sizes, x0.options().dtype(static_cast<at::ScalarType>(ctx->saved_data["n0.x_dtype"].toInt())));
    size_t first = 0;  // the slice's five saved tensors, for a normed slice
    for (int64_t i = 0; i < parts; ++i) {
      Tensor slot = d.narrow(-1, i * h, h);
      const bool norm = is_normed(i, group, normed);
      if (!grads[i].defined()) slot.zero_();
      else if (norm) modln_backward_pass(ctx, fmt::format("n{}.", i), saved, first, grads[i], Tensor(), slot);
      else slot.copy_(grads[i]);
      if (norm) first += 5;
    }
    return {d, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct GatedResidualFn : torch::autograd::Function<GatedResidualFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& gate_in,
                        const Tensor& h_in) {
    const DeviceGuard guard(x_in);
    const Tensor x = x_in.contiguous(), gate = gate_in.contiguous(), h = h_in.contiguous();
    const int64_t B = x.size(0), T = x.size(1), d = x.size(2);
    auto out = at::empty(x.sizes(), x.options());
    MD_KERNEL(x, gated_residual_forward, x.data_ptr(), kdt(x.scalar_type()), gate.data_ptr(),
              kdt(gate.scalar_type()), h.data_ptr(), kdt(h.scalar_type()), out.data_ptr(), B, T, d);
    ctx->save_for_backward({gate, h});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &gate = saved[0], &h = saved[1];
    const DeviceGuard guard(h);
    const int64_t B = h.size(0), T = h.size(1), d = h.size(2);
    const Tensor dout = grads[0].contiguous();
    variable_list g(3);
    g[0] = grads[0];
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      auto dh = at::empty(h.sizes(), h.options());
      auto dgate = at::zeros({B, d}, h.options().dtype(at::kFloat));
      MD_KERNEL(h, gated_residual_backward, dout.data_ptr(), kdt(dout.scalar_type()), gate.data_ptr(),
                kdt(gate.scalar_type()), h.data_ptr(), kdt(h.scalar_type()), dh.data_ptr(),
                dgate.data_ptr<float>(), B, T, d);
      g[1] = dgate.to(gate.scalar_type());
      g[2] = dh;
    }
    return g;
  }
};

struct SwiGLUFn : torch::autograd::Function<SwiGLUFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& u, const Tensor& v) {
    ctx->save_for_backward({u, v});
    return swiglu_product(u, v);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [du, dv] = swiglu_grads(grads[0], saved[0], saved[1]);
    return {du, dv};
  }
};

}  // namespace

bool fused_swiglu_applies(const Tensor& u, const Tensor& v) {
  return fused_kernels_apply(u) && v.defined() && v.sizes() == u.sizes() &&
         v.scalar_type() == u.scalar_type() && v.device() == u.device() && v.layout() == at::kStrided;
}

Tensor fused_swiglu(const Tensor& u, const Tensor& v) {
  MD_CHECK(fused_swiglu_applies(u, v),
           "fused SwiGLU: u and v of one shape and dtype (float32 or bf16 on the CPU, or CUDA with the fused "
           "kernels), got {} {} and {} {}",
           c10::str(u.sizes()), c10::toString(u.scalar_type()), c10::str(v.sizes()), c10::toString(v.scalar_type()));
  RECORD_FUNCTION("microdit::fused_swiglu", std::vector<c10::IValue>());
  return SwiGLUFn::apply(u, v);
}

Tensor swiglu_product(Tensor u_in, const Tensor& v_in) {
  RECORD_FUNCTION("microdit::swiglu_product", std::vector<c10::IValue>());
  const DeviceGuard device(u_in);
  // A handed-over u receives the product when nothing records gradients (see scratch_like).
  Tensor p = !torch::GradMode::is_enabled() && u_in.is_cpu() && scratch_like(u_in, u_in) ? u_in : Tensor();
  const Tensor u = u_in.contiguous(), v = v_in.contiguous();
  if (!p.defined()) p = at::empty(u.sizes(), u.options());
  MD_KERNEL(u, swiglu_forward, u.data_ptr(), v.data_ptr(), p.data_ptr(), kdt(u.scalar_type()), u.numel());
  return p;
}

std::pair<Tensor, Tensor> swiglu_grads(const Tensor& dp_in, const Tensor& u_in, const Tensor& v_in) {
  const DeviceGuard guard(u_in);
  const Tensor dp = dp_in.to(u_in.scalar_type()).contiguous(), u = u_in.contiguous(), v = v_in.contiguous();
  auto du = at::empty(u.sizes(), u.options()), dv = at::empty(u.sizes(), u.options());
  MD_KERNEL(u, swiglu_backward, dp.data_ptr(), u.data_ptr(), v.data_ptr(), du.data_ptr(), dv.data_ptr(),
            kdt(u.scalar_type()), u.numel());
  return {du, dv};
}

bool fused_kernels_apply(const Tensor& x) {
  if (!x.defined() || x.numel() == 0 || x.layout() != at::kStrided) return false;
  if (x.is_cuda()) return kernels::available() && kernel_dtype(x.scalar_type());
  return x.is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
}

Tensor fused_modulated_layer_norm(const Tensor& x, const Tensor& weight, const Tensor& shift,
                                  const Tensor& scale, double eps, at::ScalarType out,
                                  at::ScalarType save) {
  MD_CHECK(fused_kernels_apply(x), "fused LayerNorm: needs a float32 or bf16 CPU tensor, or a CUDA tensor and the fused CUDA kernels");
  MD_CHECK(kernel_dtype(out) && kernel_dtype(save), "fused LayerNorm: bad result or saved dtype");
  MD_CHECK(shift.defined() == scale.defined(), "fused LayerNorm: shift and scale go together");
  if (shift.defined())
    MD_CHECK(x.dim() == 3 && shift.dim() == 2 && scale.dim() == 2 && shift.size(0) == x.size(0) &&
                 scale.size(0) == x.size(0) && shift.size(1) == x.size(2) && scale.size(1) == x.size(2),
             "fused LayerNorm: x (B, T, d) with shift, scale (B, d), got {}, {}, {}",
             c10::str(x.sizes()), c10::str(shift.sizes()), c10::str(scale.sizes()));
  if (weight.defined())
    MD_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "fused LayerNorm: weight must be (d)");
  RECORD_FUNCTION("microdit::fused_modulated_layer_norm", std::vector<c10::IValue>());
  return ModulatedLayerNormFn::apply(x, or_empty(weight, x), or_empty(shift, x), or_empty(scale, x),
                                     eps, out, save);
}

std::pair<Tensor, Tensor> fused_residual_layer_norm(const Tensor& x, const Tensor& weight, const Tensor& shift,
                                                    const Tensor& scale, double eps, at::ScalarType out,
                                                    at::ScalarType save) {
  MD_CHECK(fused_kernels_apply(x), "fused LayerNorm: needs a float32 or bf16 CPU tensor, or a CUDA tensor and the fused CUDA kernels");
  MD_CHECK(kernel_dtype(out) && kernel_dtype(save), "fused LayerNorm: bad result or saved dtype");
  MD_CHECK(shift.defined() == scale.defined(), "fused LayerNorm: shift and scale go together");
  MD_CHECK(x.dim() == 3 && (!shift.defined() || (shift.dim() == 2 && scale.dim() == 2 && shift.size(0) == x.size(0) &&
                                                 shift.size(1) == x.size(2) && scale.sizes() == shift.sizes())),
           "fused LayerNorm: x (B, T, d) with shift, scale (B, d), got {}, {}, {}", c10::str(x.sizes()),
           c10::str(shift.sizes()), c10::str(scale.sizes()));
  if (weight.defined())
    MD_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "fused LayerNorm: weight must be (d)");
  RECORD_FUNCTION("microdit::fused_residual_layer_norm", std::vector<c10::IValue>());
  auto r = ResidualLayerNormFn::apply(x, or_empty(weight, x), or_empty(shift, x), or_empty(scale, x), eps, out, save);
  return {r[0], r[1]};
}

namespace {

variable_list split_norm(const char* what, const Tensor& p, int64_t parts, int64_t group, int64_t normed,
                         double eps, at::ScalarType out, at::ScalarType save) {
  MD_CHECK(fused_kernels_apply(p), "fused {} norm: needs a float32 or bf16 CPU tensor, or a CUDA tensor and the fused CUDA kernels", what);
  MD_CHECK(kernel_dtype(out) && kernel_dtype(save), "fused {} norm: bad result or saved dtype", what);
  MD_CHECK(p.dim() >= 2 && p.size(-1) % parts == 0 && p.stride(-1) == 1 && row_stride(p) >= 0,
           "fused {} norm: a (..., {}h) tensor with rows of one stride, got {}", what, parts, c10::str(p.sizes()));
  return SplitNormFn::apply(p, parts, group, normed, eps, out, save);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> fused_qkv_norm(const Tensor& qkv, double eps, at::ScalarType out,
                                                  at::ScalarType save) {
  RECORD_FUNCTION("microdit::fused_qkv_norm", std::vector<c10::IValue>());
  auto r = split_norm("q, k", qkv, 3, 3, 2, eps, out, save);
  return {r[0], r[1], r[2]};
}

std::pair<Tensor, Tensor> fused_kv_norm(const Tensor& kv, double eps, at::ScalarType out, at::ScalarType save) {
  RECORD_FUNCTION("microdit::fused_kv_norm", std::vector<c10::IValue>());
  auto r = split_norm("k", kv, 2, 2, 1, eps, out, save);
  return {r[0], r[1]};
}

std::vector<Tensor> fused_kv_norms(const Tensor& kv, int64_t n, double eps, at::ScalarType out, at::ScalarType save) {
  RECORD_FUNCTION("microdit::fused_kv_norms", std::vector<c10::IValue>());
  MD_CHECK(n >= 1, "fused k norms: need at least one [k | v] pair, got {}", n);
  return split_norm("k", kv, 2 * n, 2, 1, eps, out, save);
}

Tensor fused_gated_residual(const Tensor& x, const Tensor& gate, Tensor h) {
  MD_CHECK(fused_kernels_apply(x) && fused_kernels_apply(gate) && fused_kernels_apply(h),
           "fused residual: needs float32 or bf16 CPU tensors, or CUDA tensors and the fused CUDA kernels");
  MD_CHECK(x.dim() == 3 && h.sizes() == x.sizes() && gate.dim() == 2 && gate.size(0) == x.size(0) &&
               gate.size(1) == x.size(2),
           "fused residual: x, h (B, T, d) and gate (B, d), got {}, {}, {}", c10::str(x.sizes()),
           c10::str(gate.sizes()), c10::str(h.sizes()));
  RECORD_FUNCTION("microdit::fused_gated_residual", std::vector<c10::IValue>());
  if (torch::GradMode::is_enabled() || !x.is_cpu()) return GatedResidualFn::apply(x, gate, h);
  // Nothing records gradients (sampling): the kernel alone, its sum written over a handed-over h
  // (each element is read before it is written).
  Tensor out = scratch_like(h, x) ? h : at::empty(x.sizes(), x.options());
  const Tensor xc = x.contiguous(), gc = gate.contiguous(), hc = h.contiguous();
  kernels::cpu::gated_residual_forward(xc.data_ptr(), kdt(xc.scalar_type()), gc.data_ptr(), kdt(gc.scalar_type()),
                                       hc.data_ptr(), kdt(hc.scalar_type()), out.data_ptr(), x.size(0), x.size(1),
                                       x.size(2));
  return out;
}

bool fused_residual_norm_applies(const Tensor& x, const Tensor& gate, const Tensor& h, const Tensor& weight,
                                 const Tensor& shift, const Tensor& scale) {
  auto f32 = [](const Tensor& t) { return t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(); };
  if (!f32(x) || x.dim() != 3 || !f32(h) || h.sizes() != x.sizes()) return false;
  const int64_t B = x.size(0), d = x.size(2);
  auto per_sample = [&](const Tensor& t) { return !t.defined() || (f32(t) && t.dim() == 2 && t.size(0) == B && t.size(1) == d); };
  return kernels::cpu::float32_rows_apply(d) && per_sample(gate) && per_sample(shift) &&
         per_sample(scale) && shift.defined() == scale.defined() &&
         (!weight.defined() || (f32(weight) && weight.dim() == 1 && weight.size(0) == d));
}

bool fused_norm_in_place_applies(const Tensor& x, const Tensor& weight) {
  if (!x.is_cpu() || x.scalar_type() != at::kFloat || x.dim() < 2 || x.stride(-1) != 1 || x.numel() == 0) return false;
  for (int64_t i = 0; i + 2 < x.dim(); ++i)  // the rows one stride apart
    if (x.size(i) > 1 && x.stride(i) != x.stride(i + 1) * x.size(i + 1)) return false;
  const int64_t d = x.size(-1);
  return kernels::cpu::float32_rows_apply(d) && x.stride(-2) >= d &&
         (!weight.defined() || (weight.is_cpu() && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                                weight.dim() == 1 && weight.size(0) == d));
}

void fused_norm_in_place(const Tensor& x, const Tensor& weight, double eps) {
  MD_CHECK(fused_norm_in_place_applies(x, weight),
           "fused in-place LayerNorm: needs float32 CPU rows of a width that is a multiple of 16, one stride apart, "
           "on an AVX-512 CPU; got {} with strides {}", c10::str(x.sizes()), c10::str(x.strides()));
  RECORD_FUNCTION("microdit::fused_norm_in_place", std::vector<c10::IValue>());
  const int64_t d = x.size(-1), rows = x.numel() / d;
  std::vector<float> stats(static_cast<size_t>(2 * rows));  // mean, rstd: not kept
  kernels::cpu::layer_norm_in_place(x.data_ptr<float>(), x.stride(-2), weight.defined() ? weight.data_ptr<float>() : nullptr,
                                    stats.data(), stats.data() + rows, rows, d, static_cast<float>(eps));
}

std::pair<Tensor, Tensor> fused_residual_norm(const Tensor& x, const Tensor& gate, Tensor h,
                                              const Tensor& weight, const Tensor& shift, const Tensor& scale,
                                              double eps) {
  MD_CHECK(fused_residual_norm_applies(x, gate, h, weight, shift, scale),
           "fused residual LayerNorm: needs float32 contiguous CPU tensors x, h (B, T, d) with d a multiple of "
           "16 on an AVX-512 CPU, and gate, shift, scale (B, d), weight (d) or none; got x {}, h {}",
           c10::str(x.sizes()), c10::str(h.sizes()));
  RECORD_FUNCTION("microdit::fused_residual_norm", std::vector<c10::IValue>());
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2);
  Tensor sum = scratch_like(h, x) ? h : at::empty_like(x), y = at::empty_like(x);
  std::vector<float> stats(static_cast<size_t>(2 * B * T));  // mean, rstd: not kept
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  kernels::cpu::residual_modln_forward(x.data_ptr<float>(), ptr(gate), h.data_ptr<float>(), sum.data_ptr<float>(),
                                       ptr(weight), ptr(shift), ptr(scale), y.data_ptr<float>(), stats.data(),
                                       stats.data() + B * T, B * T, T, d, static_cast<float>(eps));
  return {sum, y};
}

bool moe_expert_sum_applies(const Tensor& x, int64_t experts, at::ScalarType dt) {
  return experts <= 64 && fused_kernels_apply(x) && (!x.is_cpu() || dt == at::kFloat || dt == at::kBFloat16) &&
         kernel_dtype(dt);
}

Tensor moe_expert_sum(const Tensor& src_in, const Tensor& w_in, const Tensor& inv_in, at::ScalarType dt) {
  MD_CHECK(src_in.dim() == 4 && inv_in.dim() == 3 && inv_in.size(0) == src_in.size(1) &&
               inv_in.size(2) == src_in.size(0) && inv_in.scalar_type() == at::kInt &&
               inv_in.device() == src_in.device(),
           "expert sum: src (E, B, k, d) and inv (B, T, E) int32 on its device, got {} and {}",
           c10::str(src_in.sizes()), c10::str(inv_in.sizes()));
  MD_CHECK(moe_expert_sum_applies(src_in, src_in.size(0), dt),
           "expert sum: needs at most 64 experts (got {}) and a float32 or bf16 CPU tensor, or a CUDA tensor and "
           "the fused CUDA kernels", src_in.size(0));
  const int64_t E = src_in.size(0), B = src_in.size(1), k = src_in.size(2), d = src_in.size(3), T = inv_in.size(1);
  MD_CHECK(!w_in.defined() || (w_in.sizes() == at::IntArrayRef{B, E, k} && w_in.device() == src_in.device()),
           "expert sum: weights (B, E, k) = ({}, {}, {}) on the experts' device, got {}", B, E, k,
           c10::str(w_in.sizes()));
  const DeviceGuard device(src_in);
  const Tensor src = src_in.contiguous(), inv = inv_in.contiguous();
  const Tensor w = w_in.defined() ? w_in.to(at::kFloat).contiguous() : Tensor();
  auto dst = at::empty({B, T, d}, src.options().dtype(dt));
  RECORD_FUNCTION("microdit::moe_expert_sum", std::vector<c10::IValue>());
  MD_KERNEL(src, moe_scatter_sum, src.data_ptr(), kdt(src.scalar_type()), w.defined() ? w.data_ptr<float>() : nullptr,
            inv.data_ptr<int32_t>(), dst.data_ptr(), kdt(dt), B, T, E, k, d);
  return dst;
}

}  // namespace microdit
