#include "model/recompute.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "core/autocast.h"

namespace microdit {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RecomputedBlock : torch::autograd::Function<RecomputedBlock> {
  // Inputs: x (B, N, d), the caption's k and v (B, L, heads, hd), c (B, D), then the block's
  // parameters (only so that the engine routes their gradients).
  static variable_list forward(AutogradContext* ctx, DiTBlockImpl* block, const Tensor& x, const Tensor& k,
                               const Tensor& v, const Tensor& c, at::TensorList params) {
    const auto type = x.device().type();
    ctx->saved_data["block"] = reinterpret_cast<int64_t>(block);
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(type);
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    ctx->save_for_backward({x, k, v, c});
    return {block->forward(x, CaptionKV{k, v}, c)};  // runs without recording a graph
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto* block = reinterpret_cast<DiTBlockImpl*>(ctx->saved_data["block"].toInt());
    const auto saved = ctx->get_saved_variables();  // x, k, v, c
    std::vector<Tensor> in, wrt;
    for (const auto& t : saved) {
      in.push_back(t.detach().requires_grad_(t.requires_grad()));
      if (t.requires_grad()) wrt.push_back(in.back());
    }
    const auto params = block->parameters();
    for (const auto& p : params)
      if (p.requires_grad()) wrt.push_back(p);
    Tensor out;
    {
      torch::AutoGradMode grad_on(true);
      AutocastGuard autocast(in[0].device().type(), ctx->saved_data["autocast"].toBool());
      out = block->forward(in[0], CaptionKV{in[1], in[2]}, in[3]);
    }
    auto grads = torch::autograd::grad({out}, wrt, {grad_out[0]}, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
    // One gradient per forward argument: none for the block pointer, then x, k, v, c, params.
    variable_list result{Tensor()};
    size_t g = 0;
    for (const auto& t : saved) result.push_back(t.requires_grad() ? grads[g++] : Tensor());
    for (const auto& p : params) result.push_back(p.requires_grad() ? grads[g++] : Tensor());
    return result;
  }
};

}  // namespace

Tensor recompute_block(DiTBlockImpl& block, const Tensor& x, const CaptionKV& caption, const Tensor& c) {
  const auto params = block.parameters();
  return RecomputedBlock::apply(&block, x, caption.k, caption.v, c, at::TensorList(params))[0];
}

}  // namespace microdit
