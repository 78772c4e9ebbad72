#include "core/cpu_matmul.h"

#include "core/choice.h"
#include "core/error.h"
#include "kernels/gemm_cpu.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace microdit {

using at::Tensor;

namespace {

std::atomic<CpuMatmul> g_mode{default_cpu_fp32_matmul()};

// mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars,
// str? algorithm) -> X W^T + B. The operator Inductor emits for CPU linear layers; W may be a
// strided view (a transpose), which the gradients below rely on.
using LinearPointwise = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                               c10::string_view, c10::List<std::optional<c10::Scalar>>,
                               std::optional<c10::string_view>);

const std::optional<c10::TypedOperatorHandle<LinearPointwise>>& linear_pointwise() {
  static const auto op = []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h) return std::nullopt;
    return h->typed<LinearPointwise>();
  }();
  return op;
}

// x (..., K) @ w (N, K)^T + b
Tensor onednn_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  return linear_pointwise()->call(x, w, b, "none", c10::List<std::optional<c10::Scalar>>(),
                                  std::nullopt);
}

// A 2-D float32 tensor as kernels/gemm_cpu.h reads it: one of its strides must be 1 (the
// transposed views the gradients pass have that), otherwise it is copied first.
kernels::cpu::StridedMatrix strided(Tensor& t) {
  if (t.size(0) > 1 && t.size(1) > 1 && t.stride(0) != 1 && t.stride(1) != 1) t = t.contiguous();
  return {t.const_data_ptr<float>(), t.stride(0), t.stride(1)};
}

// x (M, K) @ w^T + b for w (N, K), through microdit's own kernels: (M, N).
Tensor own_linear_2d(Tensor x, Tensor w, const std::optional<Tensor>& b) {
  RECORD_FUNCTION("microdit::gemm", std::vector<c10::IValue>({x, w}));
  const auto M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const Tensor bias = b ? b->contiguous() : Tensor();
  const auto A = strided(x), W = strided(w);
  kernels::cpu::gemm_f32(M, N, K, A, {W.p, W.cs, W.rs}, out.mutable_data_ptr<float>(), N, false,
                         bias.defined() ? bias.const_data_ptr<float>() : nullptr);
  return out;
}

std::atomic<int64_t> g_own_min_columns{kOwnMinColumns};
// An (M x K) @ (K x N) product for microdit's kernels: N >= own_min_columns(), and M and K at
// least kOwnMinRows (or own_min_columns() where that is lower: the tests' setting). Below 128
// rows or 128 of depth (the adaLN and timestep products: 16 rows, or 16 deep) MKL's kernels ran
// 5-30 % faster on a Xeon.
bool own_product(int64_t M, int64_t N, int64_t K) {
  const int64_t columns = g_own_min_columns, least = std::min(columns, kOwnMinRows);
  return g_mode == CpuMatmul::kOwn && N >= columns && M >= least && K >= least;
}

// The library for the float32 products microdit's kernels do not take: MKL (LibTorch's ATen
// operators) on Intel CPUs, which run MKL's tuned kernels, and oneDNN on the others, where MKL
// runs its generic ones at half oneDNN's speed (docs/performance.md).
CpuMatmul library_without_own_kernels() {
  static const CpuMatmul m = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") ? CpuMatmul::kMkl : CpuMatmul::kOneDnn;
  }();
  return m;
}

// Who runs an (M x K) @ (K x N) product now: the mode's library, except under kOwn, where
// microdit's kernels take the products own_product() accepts and the others go to
// library_without_own_kernels().
CpuMatmul library_for(int64_t M, int64_t N, int64_t K) {
  const CpuMatmul mode = g_mode;
  if (mode != CpuMatmul::kOwn) return mode;
  return own_product(M, N, K) ? CpuMatmul::kOwn : library_without_own_kernels();
}

// x (..., K) @ w (N, K)^T + b, by library_for().
Tensor fast_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  switch (library_for(x.numel() / std::max<int64_t>(x.size(-1), 1), w.size(0), w.size(1))) {
    case CpuMatmul::kMkl: return at::linear(x, w, b ? *b : Tensor());
    case CpuMatmul::kOneDnn: return onednn_linear(x, w, b);
    case CpuMatmul::kOwn: break;
  }
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return own_linear_2d(x.reshape({-1, x.size(-1)}), w, b).view(sizes);
}

// a (M, K) @ b (K, N), by library_for(); oneDNN's weight is b^T (N, K), passed as a transposed view.
Tensor fast_mm(const Tensor& a, const Tensor& b) {
  switch (library_for(a.size(0), b.size(1), a.size(1))) {
    case CpuMatmul::kMkl: return at::mm(a, b);
    case CpuMatmul::kOneDnn: return onednn_linear(a, b.t(), std::nullopt);
    case CpuMatmul::kOwn: break;
  }
  return own_linear_2d(a, b.t(), std::nullopt);
}

bool fp32_cpu(const Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided;
}

// Gradients of y = x w^T (+ b) for y's gradient g: (dx, dw, db), each only if asked for.
torch::autograd::tensor_list linear_grads(torch::autograd::AutogradContext* ctx, const Tensor& grad,
                                          bool with_bias) {
  const auto saved = ctx->get_saved_variables();
  const auto &x = saved[0], &w = saved[1];
  const auto N = w.size(0), K = w.size(1);
  const auto g = grad.reshape({-1, N});  // (M, N)
  Tensor gx, gw, gb;
  if (ctx->needs_input_grad(0)) gx = fast_mm(g, w).view(x.sizes());      // (M, N) @ (N, K)
  if (ctx->needs_input_grad(1)) gw = fast_mm(g.t(), x.reshape({-1, K}));  // (N, M) @ (M, K)
  if (!with_bias) return {gx, gw};
  if (ctx->needs_input_grad(2)) gb = g.sum(0);
  return {gx, gw, gb};
}

// A custom Function's inputs must all be defined tensors, so with and without bias are two.
struct LinearFn : torch::autograd::Function<LinearFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w,
                        const Tensor& b) {
    ctx->save_for_backward({x, w});
    return fast_linear(x, w, b);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    return linear_grads(ctx, grads[0], true);
  }
};

struct LinearNoBiasFn : torch::autograd::Function<LinearNoBiasFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w) {
    ctx->save_for_backward({x, w});
    return fast_linear(x, w, std::nullopt);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    return linear_grads(ctx, grads[0], false);
  }
};

namespace cpu = kernels::cpu;

// (E, ·, ·) operand e's matrix as gemm_f32 reads it, and the step between e and e + 1: one of
// its inner strides must be 1, otherwise it is copied first.
cpu::StridedMatrix strided(Tensor& t, int64_t& step) {
  if (t.size(1) > 1 && t.size(2) > 1 && t.stride(1) != 1 && t.stride(2) != 1) t = t.contiguous();
  step = t.stride(0);
  return {t.const_data_ptr<float>(), t.stride(1), t.stride(2)};
}

// E products of (M x K) by (K x N) into out (E, M, N): a(e)'s and b(e)'s elements at
// a.data + e * a_step + (row, col) strides, the same for b, and the extras with their pointer
// moved by e * x_step.
void own_batched(int64_t E, int64_t M, int64_t N, int64_t K, cpu::StridedMatrix a, int64_t a_step,
                 cpu::StridedMatrix b, int64_t b_step, Tensor& out, cpu::GemmExtras x, int64_t x_step) {
  float* c = out.mutable_data_ptr<float>();
  const float* x0 = x.gelu_grad_at;
  for (int64_t e = 0; e < E; ++e) {
    if (x0) x.gelu_grad_at = x0 + e * x_step;
    cpu::gemm_f32(M, N, K, {a.p + e * a_step, a.rs, a.cs}, {b.p + e * b_step, b.rs, b.cs}, c + e * M * N, N, false,
                  nullptr, x);
  }
}

// a (E, M, K) @ b (E, K, N) on microdit's own kernels, with the extras (no per-product pointers).
Tensor own_bmm(const Tensor& a, const Tensor& b, const cpu::GemmExtras& x) {
  const auto E = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  auto out = at::empty({E, M, N}, a.options());
  if (M == 0) return out;
  Tensor a3 = a, b3 = b;
  int64_t a_step = 0, b_step = 0;
  const auto A = strided(a3, a_step), B = strided(b3, b_step);
  own_batched(E, M, N, K, A, a_step, B, b_step, out, x, 0);
  return out;
}

struct BmmFn : torch::autograd::Function<BmmFn> {
  // a (E, M, K) @ b (E, K, N), by library_for(): with oneDNN one product per leading index, stacked.
  static Tensor product(const Tensor& a, const Tensor& b) {
    switch (library_for(a.size(1), b.size(2), a.size(2))) {
      case CpuMatmul::kMkl: return at::bmm(a, b);
      case CpuMatmul::kOwn: {
        RECORD_FUNCTION("microdit::gemm", std::vector<c10::IValue>({a, b}));
        return own_bmm(a, b, {});
      }
      case CpuMatmul::kOneDnn: break;
    }
    std::vector<Tensor> out;
    out.reserve(static_cast<size_t>(a.size(0)));
    for (int64_t e = 0; e < a.size(0); ++e) out.push_back(onednn_linear(a[e], b[e].t(), std::nullopt));
    return at::stack(out);
  }
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& a, const Tensor& b) {
    ctx->save_for_backward({a, b});
    return product(a, b);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &a = saved[0], &b = saved[1];
    const auto& g = grads[0];  // (E, M, N)
    Tensor ga, gb;
    if (ctx->needs_input_grad(0)) ga = product(g, b.transpose(1, 2));  // (E, M, N) @ (E, N, K)
    if (ctx->needs_input_grad(1)) gb = product(a.transpose(1, 2), g);  // (E, K, M) @ (E, M, N)
    return {ga, gb};
  }
};

struct GeluBmmOwnFn : torch::autograd::Function<GeluBmmOwnFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& a, const Tensor& w) {
    RECORD_FUNCTION("microdit::gemm_gelu", std::vector<c10::IValue>({a, w}));
    ctx->save_for_backward({a, w});
    cpu::GemmExtras x;
    x.gelu_a = true;  // GELU(a) as a's panels are packed
    return own_bmm(a, w, x);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    RECORD_FUNCTION("microdit::gemm_gelu_backward", std::vector<c10::IValue>());
    const auto saved = ctx->get_saved_variables();
    const Tensor &a = saved[0], &w = saved[1];
    const Tensor g = grads[0].contiguous();  // (E, M, d)
    const auto E = a.size(0), M = a.size(1), n = a.size(2), d = w.size(2);
    const cpu::StridedMatrix A{a.const_data_ptr<float>(), n, 1}, G{g.const_data_ptr<float>(), d, 1};
    Tensor da, dw;
    if (ctx->needs_input_grad(1)) {  // dw (n, d) = GELU(a)^T g, GELU again as a^T is packed
      dw = at::empty({E, n, d}, a.options());
      cpu::GemmExtras x;
      x.gelu_a = true;
      own_batched(E, n, d, M, {A.p, A.cs, A.rs}, M * n, G, M * d, dw, x, 0);
    }
    if (ctx->needs_input_grad(0)) {  // da (M, n) = (g w^T) * GELU'(a)
      da = at::empty({E, M, n}, a.options());
      cpu::GemmExtras x;
      x.gelu_grad_at = A.p;
      x.ld_gelu_grad = n;
      own_batched(E, M, n, d, G, M * d, {w.const_data_ptr<float>(), w.stride(2), w.stride(1)}, w.stride(0), da, x,
                  M * n);
    }
    return {da, dw};
  }
};

// ---- bf16 products under CPU autocast (kernels/gemm_cpu_bf16.cpp) -----------------------

bool float_or_bf16_cpu(const Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}

// A 2-D float32 or bf16 tensor as gemm_bf16 reads it (copied first where neither stride is 1),
// or its transpose.
cpu::AnyMatrix any_matrix(Tensor& t, bool transposed = false) {
  if (t.size(0) > 1 && t.size(1) > 1 && t.stride(0) != 1 && t.stride(1) != 1) t = t.contiguous();
  const bool bf16 = t.scalar_type() == at::kBFloat16;
  return transposed ? cpu::AnyMatrix{t.const_data_ptr(), t.stride(1), t.stride(0), bf16}
                    : cpu::AnyMatrix{t.const_data_ptr(), t.stride(0), t.stride(1), bf16};
}

// ---- weights packed once (PackedWeights) -------------------------------------------------

// The tensors of the live PackedWeights scopes, by data pointer, with the packs made of them: one
// per layout a product reads a weight in (its sizes and strides), each holding one pack per
// matrix (E for a bmm operand). Entries are made with their storage and never changed but for
// their panels, so a thread that holds one may read it while others look up or add theirs. The
// threads that need an entry while it is being filled fill it together, a panel of 32 columns at
// a time (the CPU workers of a step reach each weight at about the same moment): packing takes
// the time of part of it.
//
// The CPU workers look weights up about 300 times a step each, at about the same moments, so
// the registry's lock is a spin lock: a std::mutex (and the std::call_once that allocated an
// entry's storage until session 33) put the waiting worker to sleep, ~11 times a step, and
// waking it cost more than the wait (perf's sched_switch events). Entries get their storage from
// the spares of the previous scope's entries (the same sizes, step after step), so a step
// neither allocates nor faults in pack memory; the spares a scope does not take are freed as it
// ends.
struct PackEntry {
  std::atomic<int64_t> next{0}, done{0};  // panels claimed, and packed, over all E matrices
  int64_t panels = 0;                     // per matrix
  int64_t version = 0;  // the weight's version counter when the entry was made
  int64_t bytes = 0;    // the packs' size, counted against kPackedWeightBudget from the start
  std::vector<cpu::PackedBf16> packs;
};
struct Registered {
  Tensor weight;
  int scopes = 0;
  std::map<std::vector<int64_t>, std::shared_ptr<PackEntry>> packs;
};

// Spins until ready() (with the CPU's pause hint), yielding the core every `yield_every` spins
// should the thread it waits for have been preempted. For waits of microseconds between busy
// threads, where sleeping and waking would cost more than the wait.
template <class Ready>
void spin_until(const Ready& ready, int yield_every) {
  for (int spins = 0; !ready();)
    if (++spins % yield_every == 0) std::this_thread::yield();
    else _mm_pause();
}

// A lock for short critical sections between a few busy threads.
class SpinLock {
 public:
  void lock() {
    while (held_.exchange(true, std::memory_order_acquire))
      spin_until([&] { return !held_.load(std::memory_order_relaxed); }, 1024);
  }
  void unlock() { held_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> held_{false};
};

struct PackRegistry {
  SpinLock mu;
  std::map<const void*, Registered> weights;
  int64_t bytes = 0;  // of the packs held
  PackedWeightStats stats;
  // Storage of packs no longer held, by size in bytes, for the next scope's entries.
  std::multimap<int64_t, cpu::PackedBf16> spare;
  int64_t spare_bytes = 0;
};
PackRegistry& registry() {
  static auto* r = new PackRegistry();  // never destroyed: scopes may end during static destruction
  return *r;
}
std::atomic<int> g_scopes{0};  // live PackedWeights scopes: none, and a product looks nothing up

// Storage for a (K x N) pack: a spare one of its size, or new. The caller holds r.mu.
cpu::PackedBf16 pack_storage(PackRegistry& r, int64_t K, int64_t N) {
  const int64_t bytes = cpu::packed_bf16_bytes(K, N);
  const auto it = r.spare.find(bytes);
  if (it == r.spare.end()) return cpu::packed_bf16_storage(K, N);
  cpu::PackedBf16 p = std::move(it->second);  // as many words: any shape's panels fit
  r.spare.erase(it);
  r.spare_bytes -= bytes;
  p.K = K;
  p.N = N;
  return p;
}

// The packs of B as a product reads it, (K, N) or (E, K, N) (a view of a registered weight: the
// weight itself, or its transpose), or null where B is no registered weight, the cache is full,
// or no scope is live. The caller's B must hold the weight's values (the same elements).
std::shared_ptr<const PackEntry> packed_weight(const Tensor& b) {
  if (g_scopes.load(std::memory_order_acquire) == 0) return nullptr;
  auto& r = registry();
  std::shared_ptr<PackEntry> entry;
  const int64_t K = b.size(-2), N = b.size(-1), E = b.dim() == 3 ? b.size(0) : 1;
  {
    std::lock_guard<SpinLock> lock(r.mu);
    const auto it = r.weights.find(b.const_data_ptr());
    if (it == r.weights.end()) return nullptr;
    const Tensor& w = it->second.weight;
    if (b.numel() != w.numel() || b.scalar_type() != w.scalar_type() || b.device() != w.device()) return nullptr;
    if (b.stride(-1) != 1 && b.stride(-2) != 1) return nullptr;  // read in place by the packs (any_matrix would copy)
    std::vector<int64_t> key(b.sizes().begin(), b.sizes().end());
    key.insert(key.end(), b.strides().begin(), b.strides().end());
    auto& slot = it->second.packs[key];
    if (slot && slot->version != static_cast<int64_t>(w._version())) {  // changed in place: packed again
      r.bytes -= slot->bytes;
      slot.reset();
    }
    if (!slot) {
      const int64_t bytes = E * cpu::packed_bf16_bytes(K, N);
      if (r.bytes + bytes > kPackedWeightBudget) {
        r.stats.over_budget++;
        return nullptr;
      }
      auto made = std::make_shared<PackEntry>();
      made->version = static_cast<int64_t>(w._version());
      made->bytes = bytes;
      for (int64_t e = 0; e < E; ++e) made->packs.push_back(pack_storage(r, K, N));
      made->panels = cpu::packed_bf16_panels(made->packs.front());
      r.bytes += bytes;
      r.stats.packs++;
      slot = std::move(made);
    }
    entry = slot;
    r.stats.lookups++;
  }
  const int64_t total = E * entry->panels;
  const auto bytes = static_cast<int64_t>(b.element_size());
  const int64_t matrix_stride = b.dim() == 3 ? b.stride(0) : 0;
  for (int64_t c; (c = entry->next.fetch_add(1, std::memory_order_relaxed)) < total;) {
    const int64_t e = c / entry->panels, p = c % entry->panels;
    const cpu::AnyMatrix m{static_cast<const char*>(b.const_data_ptr()) + e * matrix_stride * bytes, b.stride(-2),
                           b.stride(-1), b.scalar_type() == at::kBFloat16};
    cpu::pack_bf16_panels(m, entry->packs[static_cast<size_t>(e)], p, p + 1);
    entry->done.fetch_add(1, std::memory_order_release);
  }
  // Another thread's last panels (a few microseconds of packing at most).
  spin_until([&] { return entry->done.load(std::memory_order_acquire) >= total; }, 256);
  return entry;
}

// C (M, N) = A @ B through gemm_bf16, bias (float32, rounded to bf16 there) or none: a bf16
// product, in `dtype`: bf16, or float32 holding the bf16 values (autocast's cast back of a
// float32 input's gradient). B (K, N) as the product reads it, packed once where it is a weight
// of a live PackedWeights scope.
Tensor bf16_product(cpu::AnyMatrix a, Tensor b, int64_t M, int64_t N, int64_t K, at::ScalarType dtype,
                    const Tensor& like, const float* bias = nullptr) {
  auto out = at::empty({M, N}, like.options().dtype(dtype));
  const auto type = dtype == at::kBFloat16 ? cpu::Bf16Out::kBf16 : cpu::Bf16Out::kFloatOfBf16;
  if (M > 0 && N > 0) {
    if (const auto packed = packed_weight(b)) cpu::gemm_bf16(M, a, packed->packs[0], out.data_ptr(), type, N, false, bias);
    else cpu::gemm_bf16(M, N, K, a, any_matrix(b), out.data_ptr(), type, N, false, bias);
  }
  return out;
}

Tensor linear_bf16_forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& b) {
  RECORD_FUNCTION("microdit::gemm_bf16", std::vector<c10::IValue>({x, w}));
  ctx->save_for_backward({x, w});
  const auto N = w.size(0), K = w.size(1);
  Tensor x2 = x.reshape({-1, K}), w2 = w, bias;
  if (b.defined()) {
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(b.scalar_type());
    bias = b.to(at::kFloat).contiguous();
  }
  auto out = bf16_product(any_matrix(x2), w2.t(), x2.size(0), N, K, at::kBFloat16, x,
                          bias.defined() ? bias.const_data_ptr<float>() : nullptr);  // (M, N)
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return out.view(sizes);
}

torch::autograd::tensor_list linear_bf16_backward(torch::autograd::AutogradContext* ctx, const Tensor& grad,
                                                  bool with_bias) {
  RECORD_FUNCTION("microdit::gemm_bf16_backward", std::vector<c10::IValue>());
  const auto saved = ctx->get_saved_variables();
  const Tensor &x = saved[0], &w = saved[1];
  const auto N = w.size(0), K = w.size(1);
  Tensor g = grad.reshape({-1, N}), x2 = x.reshape({-1, K}), w2 = w;  // g: (M, N)
  const auto M = g.size(0);
  Tensor gx, gw, gb;
  if (ctx->needs_input_grad(0))  // (M, N) @ (N, K)
    gx = bf16_product(any_matrix(g), w2, M, K, N, x.scalar_type(), x).view(x.sizes());
  if (ctx->needs_input_grad(1))  // (N, M) @ (M, K)
    gw = bf16_product(any_matrix(g, true), x2, N, K, M, w.scalar_type(), w);
  if (!with_bias) return {gx, gw};
  if (ctx->needs_input_grad(2))  // summed in g's dtype (bf16) as autocast's bf16 bias gets it, then cast back
    gb = g.sum(0).to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
  return {gx, gw, gb};
}

// y = x w^T (+ b) as CPU autocast computes it (operands rounded to bf16, float32 sums, y in bf16)
// without its casts: the kernels round float32 operands as they pack them. Each gradient is a
// bf16 product too, widened to its input's dtype as the product is stored (autocast's cast
// back). Two Functions, as their inputs must all be defined.
struct LinearBf16Fn : torch::autograd::Function<LinearBf16Fn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& b) {
    return linear_bf16_forward(ctx, x, w, b);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    return linear_bf16_backward(ctx, grads[0], true);
  }
};

struct LinearNoBiasBf16Fn : torch::autograd::Function<LinearNoBiasBf16Fn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w) {
    return linear_bf16_forward(ctx, x, w, Tensor());
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    return linear_bf16_backward(ctx, grads[0], false);
  }
};

// a (E, M, K) @ b (E, K, N) in bf16 likewise, one product per leading index.
struct BmmBf16Fn : torch::autograd::Function<BmmBf16Fn> {
  // out (E, M, N) in dtype = a (E, M, K) @ b (E, K, N), either operand strided.
  static Tensor product(const Tensor& a, const Tensor& b, at::ScalarType dtype) {
    const auto E = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
    auto out = at::empty({E, M, N}, a.options().dtype(dtype));
    const auto type = dtype == at::kBFloat16 ? cpu::Bf16Out::kBf16 : cpu::Bf16Out::kFloatOfBf16;
    if (M == 0 || N == 0) return out;
    const auto packed = packed_weight(b);  // b's E matrices packed once, where it is a weight
    for (int64_t e = 0; e < E; ++e) {
      Tensor ae = a[e], be = b[e];
      if (packed) cpu::gemm_bf16(M, any_matrix(ae), packed->packs[static_cast<size_t>(e)], out[e].data_ptr(), type, N, false, nullptr);
      else cpu::gemm_bf16(M, N, K, any_matrix(ae), any_matrix(be), out[e].data_ptr(), type, N, false, nullptr);
    }
    return out;
  }
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& a, const Tensor& b) {
    RECORD_FUNCTION("microdit::gemm_bf16", std::vector<c10::IValue>({a, b}));
    ctx->save_for_backward({a, b});
    return product(a, b, at::kBFloat16);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    RECORD_FUNCTION("microdit::gemm_bf16_backward", std::vector<c10::IValue>());
    const auto saved = ctx->get_saved_variables();
    const auto &a = saved[0], &b = saved[1];
    const auto& g = grads[0];  // (E, M, N)
    Tensor ga, gb;
    if (ctx->needs_input_grad(0)) ga = product(g, b.transpose(1, 2), a.scalar_type());  // (E, M, N) @ (E, N, K)
    if (ctx->needs_input_grad(1)) gb = product(a.transpose(1, 2), g, b.scalar_type());  // (E, K, M) @ (E, M, N)
    return {ga, gb};
  }
};

}  // namespace

namespace {

// a (E, M, K) and w (E, K, N): float32 CPU tensors of one product per expert that microdit's own
// kernels take, under --cpu-matmul microdit and outside autocast.
bool own_bmm_applies(const Tensor& a, const Tensor& w) {
  return g_mode == CpuMatmul::kOwn && cpu::gemm_f32_available() && fp32_cpu(a) && fp32_cpu(w) && a.dim() == 3 &&
         w.dim() == 3 && a.size(0) == w.size(0) && a.size(2) == w.size(1) && a.numel() > 0 && w.numel() > 0 &&
         own_product(a.size(1), w.size(2), a.size(2)) && !at::autocast::is_autocast_enabled(at::kCPU);
}

}  // namespace

bool gelu_bmm_fused_applies(const Tensor& a, const Tensor& w) { return own_bmm_applies(a, w) && a.is_contiguous(); }

Tensor gelu_bmm_fused(const Tensor& a, const Tensor& w) { return GeluBmmOwnFn::apply(a, w); }

bool bmm_gelu_applies(const Tensor& a, const Tensor& w) { return !at::GradMode::is_enabled() && own_bmm_applies(a, w); }

Tensor bmm_gelu(const Tensor& a, const Tensor& w) {
  MD_CHECK(bmm_gelu_applies(a, w), "bmm_gelu: not a product it takes (see bmm_gelu_applies)");
  RECORD_FUNCTION("microdit::gemm_gelu_out", std::vector<c10::IValue>({a, w}));
  cpu::GemmExtras x;
  x.gelu_out = true;  // GELU as C is stored
  return own_bmm(a, w, x);
}

void set_cpu_fp32_matmul(CpuMatmul m) { g_mode = m; }
CpuMatmul cpu_fp32_matmul() { return g_mode; }
void set_own_min_columns(int64_t n) { g_own_min_columns = n; }
int64_t own_min_columns() { return g_own_min_columns; }

// microdit's own kernels where the CPU has AVX-512: on a Xeon Nano training on a par with MKL to
// 4 % faster, 7 % less memory with GELU inside the expert products, the same sampling speed; on
// a Zen 4 EPYC 6-8 % faster than oneDNN in training and 1-3 % in sampling. Without AVX-512 MKL on
// Intel CPUs, which runs its tuned kernels there, and oneDNN elsewhere (docs/performance.md).
CpuMatmul default_cpu_fp32_matmul() {
  static const CpuMatmul m = [] {
    return kernels::cpu::gemm_f32_available() ? CpuMatmul::kOwn : library_without_own_kernels();
  }();
  return m;
}

CpuMatmul parse_cpu_matmul(const std::string& name) {
  if (name == "auto") return default_cpu_fp32_matmul();  // listed below for the error message
  const auto m = parse_choice<CpuMatmul>(
      "--cpu-matmul", name,
      {{"auto", CpuMatmul::kOneDnn}, {"onednn", CpuMatmul::kOneDnn}, {"mkl", CpuMatmul::kMkl}, {"microdit", CpuMatmul::kOwn}});
  MD_CHECK(m != CpuMatmul::kOwn || kernels::cpu::gemm_f32_available(),
           "--cpu-matmul microdit: this CPU has no AVX-512, which microdit's own products need (use auto)");
  return m;
}

const char* cpu_matmul_name(CpuMatmul m) {
  return m == CpuMatmul::kOneDnn ? "onednn" : m == CpuMatmul::kOwn ? "microdit" : "mkl";
}

bool uses_onednn_fp32(const Tensor& a, const Tensor& b) {
  const auto mode = g_mode.load();
  if (mode == CpuMatmul::kMkl || !fp32_cpu(a) || !fp32_cpu(b) || a.dim() < 2 || a.numel() == 0 || b.numel() == 0 ||
      at::autocast::is_autocast_enabled(at::kCPU))
    return false;
  return mode == CpuMatmul::kOwn ? kernels::cpu::gemm_f32_available() : linear_pointwise().has_value();
}

bool own_bf16_products() {
  static const bool cpu_takes_them = [] {
    __builtin_cpu_init();
    return kernels::cpu::gemm_bf16_available() && __builtin_cpu_supports("amx-bf16") == 0;
  }();
  return cpu_takes_them && g_mode == CpuMatmul::kOwn;
}

namespace {

bool bf16_cpu(const Tensor& t) { return float_or_bf16_cpu(t) && t.scalar_type() == at::kBFloat16; }

// With own_bf16_products(): float32 or bf16 CPU operands under CPU bf16 autocast, or bf16 ones
// outside it (the products in custom backward passes, which autocast does not reach, take the
// same kernels as the forward pass and its gradients, so recomputing paths agree to the bit).
bool own_bf16_product(const Tensor& a, const Tensor& b) {
  if (!own_bf16_products() || !float_or_bf16_cpu(a) || !float_or_bf16_cpu(b)) return false;
  if (at::autocast::is_autocast_enabled(at::kCPU)) return at::autocast::get_autocast_dtype(at::kCPU) == at::kBFloat16;
  return a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16;
}

}  // namespace

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  if (own_bf16_product(x, w) && w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1) &&
      (!b.defined() || (float_or_bf16_cpu(b) && b.dim() == 1 && b.size(0) == w.size(0) &&
                        (at::autocast::is_autocast_enabled(at::kCPU) || bf16_cpu(b)))))
    return b.defined() ? LinearBf16Fn::apply(x, w, b) : LinearNoBiasBf16Fn::apply(x, w);
  // Anything unusual (shape mismatch included) goes to ATen, which also words the error.
  if (!uses_onednn_fp32(x, w) || w.dim() != 2 || x.size(-1) != w.size(1) ||
      (b.defined() && (!fp32_cpu(b) || b.dim() != 1 || b.size(0) != w.size(0))))
    return at::linear(x, w, b);
  return b.defined() ? LinearFn::apply(x, w, b) : LinearNoBiasFn::apply(x, w);
}

Tensor bmm(const Tensor& a, const Tensor& b) {
  if (own_bf16_product(a, b) && a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1))
    return BmmBf16Fn::apply(a, b);
  if (!uses_onednn_fp32(a, b) || a.dim() != 3 || b.dim() != 3 || a.size(0) != b.size(0) ||
      a.size(2) != b.size(1))
    return at::bmm(a, b);
  return BmmFn::apply(a, b);
}

namespace {
std::atomic<bool> g_pack_weights{true};
}  // namespace

void set_pack_weights(bool on) { g_pack_weights = on; }
bool pack_weights() { return g_pack_weights; }

PackedWeights::PackedWeights(const std::vector<Tensor>& weights) : active_(g_pack_weights) {
  if (!active_) return;
  auto& r = registry();
  std::lock_guard<SpinLock> lock(r.mu);
  for (const auto& w : weights) {
    if (!w.defined() || !w.device().is_cpu() || w.layout() != at::kStrided || w.numel() == 0) continue;
    auto& reg = r.weights[w.const_data_ptr()];
    // Another tensor at a registered address (a view of a different size): left out.
    if (reg.scopes > 0 && (reg.weight.numel() != w.numel() || reg.weight.scalar_type() != w.scalar_type())) continue;
    if (reg.scopes == 0) reg.weight = w.detach();
    reg.scopes++;
    keys_.push_back(w.const_data_ptr());
  }
  g_scopes.fetch_add(1, std::memory_order_release);
}

PackedWeights::~PackedWeights() {
  if (!active_) return;
  auto& r = registry();
  std::lock_guard<SpinLock> lock(r.mu);
  // Spares this scope's packs did not take are of sizes no longer packed (another model, or
  // other shapes): freed, so that the spares never exceed one scope's packs.
  r.spare.clear();
  r.spare_bytes = 0;
  for (const void* k : keys_) {
    auto it = r.weights.find(k);
    if (it == r.weights.end() || --it->second.scopes > 0) continue;
    for (const auto& [key, entry] : it->second.packs) {
      r.bytes -= entry->bytes;
      // The storage of packs no product holds any more, kept for the next scope's (a product
      // still multiplying with a pack holds it until it ends). Live packs are within the budget,
      // so the spares are too.
      if (entry.use_count() != 1) continue;
      for (auto& p : entry->packs) {
        r.spare_bytes += p.bytes;
        r.spare.emplace(p.bytes, std::move(p));
      }
    }
    r.weights.erase(it);
  }
  g_scopes.fetch_sub(1, std::memory_order_release);
}

PackedWeightStats packed_weight_stats() {
  auto& r = registry();
  std::lock_guard<SpinLock> lock(r.mu);
  auto s = r.stats;
  s.bytes = r.bytes;
  s.spare_bytes = r.spare_bytes;
  return s;
}

}  // namespace microdit
