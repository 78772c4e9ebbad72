#include "model/ffn.h"

#include "core/cpu_matmul.h"
#include "model/config.h"

namespace microdit {

FeedForwardImpl::FeedForwardImpl(int64_t d, int64_t n, bool bias) {
  w1 = register_module("w1", make_linear(d, n, bias));
  w2 = register_module("w2", make_linear(d, n, bias));
  w3 = register_module("w3", make_linear(n, d, bias));
}

Tensor FeedForwardImpl::forward(const Tensor& x) {
  return w3(torch::silu(w1(x)) * w2(x));
}

FeedForwardECMoEImpl::FeedForwardECMoEImpl(int64_t d, int64_t n, int64_t experts, double capacity)
    : experts(experts), capacity(capacity) {
  w1 = register_parameter("w1", torch::ones({experts, d, n}));
  w2 = register_parameter("w2", torch::ones({experts, n, d}));
  gate = register_module("gate", make_linear(d, experts, false));
}

Tensor FeedForwardECMoEImpl::forward(const Tensor& x) {
  const auto B = x.size(0), T = x.size(1), d = x.size(2), E = experts;
  const int64_t k = expert_tokens(capacity, static_cast<int>(T), static_cast<int>(E));
  if (k <= 0) return torch::zeros_like(x);
  auto probs = torch::softmax(gate(x), -1);              // (B, T, E)
  auto [g, idx] = probs.transpose(1, 2).topk(k, -1);     // (B, E, k) each
  // Flat token index into (B*T) so one gather / one index_add covers the batch.
  auto flat = (idx + torch::arange(B, idx.options()).view({B, 1, 1}) * T).reshape(-1);  // (B*E*k)
  auto xin = x.reshape({B * T, d}).index_select(0, flat).view({B, E, k, d});
  // Per expert batched matmuls: (E, B*k, d) @ (E, d, n) -> gelu -> @ (E, n, d).
  auto h = xin.transpose(0, 1).reshape({E, B * k, d});
  h = microdit::bmm(at::gelu(microdit::bmm(h, w1)), w2);            // (E, B*k, d)
  h = h.view({E, B, k, d}).transpose(0, 1) * g.unsqueeze(-1);        // (B, E, k, d)
  auto out = torch::zeros({B * T, d}, h.options());
  return out.index_add(0, flat, h.reshape({B * E * k, d})).view({B, T, d});
}

}  // namespace microdit
