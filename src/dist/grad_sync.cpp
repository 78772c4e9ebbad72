#include "dist/grad_sync.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>

#include "core/error.h"

namespace microdit::dist {

namespace {

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  ReadyHook(GradSync* s, size_t b) : sync(s), bucket(b) {}
  void operator()(const torch::autograd::Variable&) override { sync->on_grad_ready(bucket); }
  GradSync* sync;
  size_t bucket;
};

}  // namespace

GradSync::GradSync(torch::nn::Module& model, Comm& comm, GradSyncOptions o) : comm_(comm), o_(std::move(o)) {
  std::vector<std::pair<std::string, Tensor>> ps;
  for (const auto& p : model.named_parameters())
    if (p.value().requires_grad()) ps.emplace_back(p.key(), p.value());
  MD_CHECK(!ps.empty(), "data parallelism: the model has no trainable parameters");
  std::reverse(ps.begin(), ps.end());  // about the order in which gradients become ready
  const auto opts = ps.front().second.options();
  const int64_t W = comm_.world();
  auto pad = [W](int64_t n) { return (n + W - 1) / W * W; };
  int64_t offset = 0;
  Bucket cur;
  auto close = [&] {
    cur.size = pad(offset - cur.offset);
    offset = cur.offset + cur.size;
    buckets_.push_back(cur);
    cur = Bucket{};
    cur.offset = offset;
  };
  for (const auto& [name, t] : ps) {
    MD_CHECK(t.scalar_type() == opts.dtype().toScalarType() && t.device() == opts.device(),
             "data parallelism: parameter '{}' is {} on {}, the others {} on {}", name,
             c10::toString(t.scalar_type()), t.device().str(), c10::toString(opts.dtype().toScalarType()),
             opts.device().str());
    params_.push_back({name, t, offset, t.numel(), buckets_.size()});
    offset += t.numel();
    ++cur.params;
    const int64_t cap = buckets_.empty() ? o_.first_bucket_bytes : o_.bucket_bytes;
    if ((offset - cur.offset) * static_cast<int64_t>(t.element_size()) >= cap) close();
  }
  if (cur.params > 0) close();

  torch::NoGradGuard ng;
  flat_p_ = torch::zeros({offset}, opts.requires_grad(false));
  flat_g_ = torch::zeros({offset}, opts.requires_grad(false));
  for (auto& p : params_) {
    auto value = flat_p_.narrow(0, p.offset, p.numel).view(p.tensor.sizes());
    value.copy_(p.tensor.detach());
    p.tensor.set_data(value);  // the parameter now lives in the flat buffer
    p.tensor.mutable_grad() = flat_g_.narrow(0, p.offset, p.numel).view(p.tensor.sizes());
    torch::autograd::impl::set_post_acc_grad_hooks(p.tensor, std::make_unique<ReadyHook>(this, p.bucket));
  }
  for (auto& b : buckets_) {
    b.grads = flat_g_.narrow(0, b.offset, b.size);
    b.values = flat_p_.narrow(0, b.offset, b.size);
    if (o_.shard) {
      b.own_grad = torch::zeros({b.size / W}, flat_g_.options());
      b.own_param = b.values.narrow(0, comm_.rank() * (b.size / W), b.size / W).clone();
    }
  }
  if (o_.shard) {
    std::vector<Tensor> own;
    for (auto& b : buckets_) {
      b.own_param.set_requires_grad(true);
      b.own_param.mutable_grad() = b.own_grad;
      own.push_back(b.own_param);
    }
    opt_ = std::make_unique<torch::optim::AdamW>(own, o_.adamw);
  }
}

GradSync::~GradSync() {
  for (auto& p : params_) torch::autograd::impl::post_acc_grad_hooks(p.tensor).reset();
}

void GradSync::broadcast_params(int root) {
  comm_.broadcast(flat_p_, root)->wait();
  params_changed();
}

void GradSync::params_changed() {
  if (!o_.shard) return;
  torch::NoGradGuard ng;
  for (auto& b : buckets_) {
    const int64_t n = b.size / comm_.world();
    b.own_param.detach().copy_(b.values.narrow(0, comm_.rank() * n, n));
  }
}

void GradSync::zero_grad() { flat_g_.zero_(); }

void GradSync::begin_backward(bool sync) {
  sync_ = sync;
  if (!sync) return;
  for (auto& b : buckets_) b.pending = b.params;
  next_ = 0;
  works_.clear();
}

void GradSync::on_grad_ready(size_t bucket) {
  if (!sync_) return;
  if (--buckets_[bucket].pending == 0)
    while (next_ < buckets_.size() && buckets_[next_].pending <= 0) launch(next_++);
}

void GradSync::launch(size_t i) {
  auto& b = buckets_[i];
  works_.push_back(o_.shard ? comm_.reduce_scatter(b.own_grad, b.grads) : comm_.allreduce(b.grads));
}

void GradSync::finish() {
  MD_CHECK(sync_, "GradSync::finish without a synced backward");
  while (next_ < buckets_.size()) launch(next_++);  // buckets with gradients that never came
  for (auto& w : works_) w->wait();
  works_.clear();
  sync_ = false;
  if (skip_average) return;
  torch::NoGradGuard ng;
  const double W = comm_.world();
  if (o_.shard) {
    for (auto& b : buckets_) b.own_grad.div_(W);
  } else {
    flat_g_.div_(W);
  }
}

double GradSync::sharded_grad_norm() {
  MD_CHECK(o_.shard, "sharded_grad_norm without a sharded optimizer");
  double sq = 0;
  for (auto& b : buckets_) sq += b.own_grad.pow(2).sum().item<double>();
  return std::sqrt(comm_.sum(sq));
}

void GradSync::sharded_clip(double max_norm, double total_norm) {
  // As torch::nn::utils::clip_grad_norm_: coefficient max / (norm + 1e-6), clamped at 1.
  const float coef = static_cast<float>(max_norm) / (static_cast<float>(total_norm) + 1e-6f);
  if (coef >= 1.0f) return;
  torch::NoGradGuard ng;
  for (auto& b : buckets_) b.own_grad.mul_(coef);
}

void GradSync::sharded_step(double lr) {
  MD_CHECK(o_.shard, "sharded_step without a sharded optimizer");
  for (auto& g : opt_->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
  opt_->step();
  torch::NoGradGuard ng;
  std::vector<Work> works;
  for (auto& b : buckets_) {
    Tensor own = b.own_param.detach();
    works.push_back(comm_.allgather(b.values, own));
  }
  for (auto& w : works) w->wait();
}

int64_t GradSync::moment_bytes() const {
  int64_t n = 0;
  for (const auto& b : buckets_) n += o_.shard ? b.size / comm_.world() : b.size;
  return 2 * n * static_cast<int64_t>(flat_p_.element_size());
}

int64_t GradSync::unsharded_moment_bytes() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.numel;
  return 2 * n * static_cast<int64_t>(flat_p_.element_size());
}

int64_t GradSync::adam_step() const {
  if (!opt_) return 0;
  auto it = opt_->state().find(buckets_.front().own_param.unsafeGetTensorImpl());
  if (it == opt_->state().end()) return 0;
  return static_cast<torch::optim::AdamWParamState&>(*it->second).step();
}

std::map<std::string, std::pair<Tensor, Tensor>> GradSync::gather_moments() {
  MD_CHECK(o_.shard, "gather_moments without a sharded optimizer");
  std::map<std::string, std::pair<Tensor, Tensor>> out;
  if (adam_step() == 0) return out;  // the same on every rank: no collective is skipped by one
  std::vector<Tensor> full_m, full_v;
  std::vector<Work> works;
  for (auto& b : buckets_) {
    auto& s = static_cast<torch::optim::AdamWParamState&>(*opt_->state().at(b.own_param.unsafeGetTensorImpl()));
    Tensor m = s.exp_avg(), v = s.exp_avg_sq();
    full_m.push_back(torch::empty({b.size}, m.options()));
    full_v.push_back(torch::empty({b.size}, v.options()));
    works.push_back(comm_.allgather(full_m.back(), m));
    works.push_back(comm_.allgather(full_v.back(), v));
  }
  for (auto& w : works) w->wait();
  for (const auto& p : params_) {
    const auto& b = buckets_[p.bucket];
    auto slice = [&](const Tensor& full) {
      return full.narrow(0, p.offset - b.offset, p.numel).view(p.tensor.sizes()).clone();
    };
    out[p.name] = {slice(full_m[p.bucket]), slice(full_v[p.bucket])};
  }
  return out;
}

void GradSync::load_moments(const std::map<std::string, std::pair<Tensor, Tensor>>& moments, int64_t step) {
  MD_CHECK(o_.shard, "load_moments without a sharded optimizer");
  if (moments.empty()) return;
  torch::NoGradGuard ng;
  const int64_t W = comm_.world();
  for (size_t i = 0; i < buckets_.size(); ++i) {
    auto& b = buckets_[i];
    auto m = torch::zeros({b.size}, flat_p_.options()), v = torch::zeros({b.size}, flat_p_.options());
    for (const auto& p : params_) {
      if (p.bucket != i) continue;
      auto it = moments.find(p.name);
      MD_CHECK(it != moments.end(), "checkpoint: optimizer moments of '{}' are missing", p.name);
      m.narrow(0, p.offset - b.offset, p.numel).copy_(it->second.first.reshape({-1}));
      v.narrow(0, p.offset - b.offset, p.numel).copy_(it->second.second.reshape({-1}));
    }
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(step);
    s->exp_avg(m.narrow(0, comm_.rank() * (b.size / W), b.size / W).clone());
    s->exp_avg_sq(v.narrow(0, comm_.rank() * (b.size / W), b.size / W).clone());
    opt_->state()[b.own_param.unsafeGetTensorImpl()] = std::move(s);
  }
}

}  // namespace microdit::dist
