// RowOptimizer: torch.optim's single-tensor SGD/Adam/AdamW maths per element, rows in parallel, one pass over
// each row's parameter, gradient and state (the element loops are plain enough for the compiler to vectorize).
#include "optim/row_optimizer.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace hotloop {

namespace {

template <typename T>
inline T lerp(T self, T end, T weight) {
  // ATen's CPU lerp, so the moving average rounds as torch.optim's exp_avg.lerp_ does
  return weight < T(0.5) ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

void check_rows(const at::Tensor& t, const at::Tensor& param, const char* what) {
  TORCH_CHECK(t.defined() && t.sizes() == param.sizes() && t.scalar_type() == param.scalar_type() &&
                  t.is_contiguous() && t.device() == param.device(),
              "RowOptimizer: ", what, " must be a contiguous tensor like the parameter rows ", param.sizes());
}

}  // namespace

RowOptimizer::RowOptimizer(Kind kind, at::Tensor param, at::Tensor last_grad, std::vector<at::Tensor> state,
                           bool maximize, bool nesterov, bool amsgrad, bool decoupled)
    : kind_(kind),
      param_(std::move(param)),
      last_grad_(std::move(last_grad)),
      state_(std::move(state)),
      maximize_(maximize),
      nesterov_(nesterov),
      amsgrad_(amsgrad),
      decoupled_(decoupled) {
  TORCH_CHECK(param_.dim() == 2 && param_.is_contiguous() && param_.device().is_cpu(),
              "RowOptimizer needs contiguous [K, P] CPU parameter rows");
  TORCH_CHECK(param_.scalar_type() == at::kFloat || param_.scalar_type() == at::kDouble,
              "RowOptimizer supports float32 and float64 parameters, got ", param_.scalar_type());
  K_ = param_.size(0);
  P_ = param_.size(1);
  check_rows(last_grad_, param_, "last_grad");
  if (kind_ == Kind::SGD) {
    TORCH_CHECK(state_.size() == 2, "RowOptimizer(SGD) takes {momentum_buffer, fresh}");
    check_rows(state_[0], param_, "momentum_buffer");
    TORCH_CHECK(state_[1].scalar_type() == at::kBool && state_[1].numel() == K_ && state_[1].is_contiguous(),
                "RowOptimizer(SGD): fresh must be [K, 1] bool");
  } else {
    TORCH_CHECK(state_.size() == (amsgrad_ ? 4u : 3u),
                "RowOptimizer(Adam) takes {exp_avg, exp_avg_sq, steps[, max_exp_avg_sq]}");
    check_rows(state_[0], param_, "exp_avg");
    check_rows(state_[1], param_, "exp_avg_sq");
    TORCH_CHECK(state_[2].scalar_type() == at::kDouble && state_[2].numel() == K_ && state_[2].is_contiguous(),
                "RowOptimizer(Adam): steps must be [K, 1] float64");
    if (amsgrad_) check_rows(state_[3], param_, "max_exp_avg_sq");
  }
}

void RowOptimizer::set_hypers(RowHypers hypers) {
  const auto k = static_cast<size_t>(K_);
  TORCH_CHECK(hypers.lr.size() == k && hypers.weight_decay.size() == k, "RowOptimizer: lr and weight_decay need ",
              K_, " values");
  if (kind_ == Kind::SGD) {
    TORCH_CHECK(hypers.momentum.size() == k && hypers.dampening.size() == k,
                "RowOptimizer(SGD): momentum and dampening need ", K_, " values");
  } else {
    TORCH_CHECK(hypers.beta1.size() == k && hypers.beta2.size() == k && hypers.eps.size() == k,
                "RowOptimizer(Adam): betas and eps need ", K_, " values");
  }
  hypers_ = std::move(hypers);
}

void RowOptimizer::step(const at::Tensor& grad, const std::vector<bool>& on) {
  TORCH_CHECK(grad.sizes() == param_.sizes() && grad.scalar_type() == param_.scalar_type(),
              "RowOptimizer: the gradient must be like the parameter rows ", param_.sizes());
  TORCH_CHECK(!hypers_.lr.empty(), "RowOptimizer: set_hypers() must come before the first step");
  TORCH_CHECK(on.empty() || static_cast<int64_t>(on.size()) == K_, "RowOptimizer: on needs ", K_, " flags");
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES(param_.scalar_type(), "RowOptimizer::step", [&] {
    const scalar_t* grads = g.const_data_ptr<scalar_t>();
    at::parallel_for(0, K_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (!on.empty() && !on[k]) continue;
        if (kind_ == Kind::SGD)
          sgd_row<scalar_t>(k, grads + k * P_);
        else
          adam_row<scalar_t>(k, grads + k * P_);
      }
    });
  });
}

template <typename T>
void RowOptimizer::sgd_row(int64_t k, const T* grad) {
  T* p = param_.mutable_data_ptr<T>() + k * P_;
  T* last = last_grad_.mutable_data_ptr<T>() + k * P_;
  T* buf = state_[0].mutable_data_ptr<T>() + k * P_;
  bool& fresh = state_[1].mutable_data_ptr<bool>()[k];
  const T wd = static_cast<T>(hypers_.weight_decay[k]);
  const T momentum = static_cast<T>(hypers_.momentum[k]);
  const T take = static_cast<T>(1.0 - hypers_.dampening[k]);
  const T neg_lr = static_cast<T>(-hypers_.lr[k]);
  const bool use_wd = hypers_.weight_decay[k] != 0.0;
  const bool use_momentum = hypers_.momentum[k] != 0.0;
  const bool first = fresh;
  for (int64_t j = 0; j < P_; ++j) {
    T d = maximize_ ? -grad[j] : grad[j];
    last[j] = grad[j];
    if (use_wd) d = d + wd * p[j];
    if (use_momentum) {
      const T b = first ? d : buf[j] * momentum + take * d;
      buf[j] = b;
      d = nesterov_ ? d + momentum * b : b;
    }
    p[j] = p[j] + neg_lr * d;
  }
  fresh = false;
}

template <typename T>
void RowOptimizer::adam_row(int64_t k, const T* grad) {
  T* p = param_.mutable_data_ptr<T>() + k * P_;
  T* last = last_grad_.mutable_data_ptr<T>() + k * P_;
  T* m = state_[0].mutable_data_ptr<T>() + k * P_;
  T* v = state_[1].mutable_data_ptr<T>() + k * P_;
  T* vmax = amsgrad_ ? state_[3].mutable_data_ptr<T>() + k * P_ : nullptr;
  double& steps = state_[2].mutable_data_ptr<double>()[k];
  steps += 1.0;
  const double lr = hypers_.lr[k], beta1 = hypers_.beta1[k], beta2 = hypers_.beta2[k];
  const bool use_wd = hypers_.weight_decay[k] != 0.0;
  const T wd = static_cast<T>(hypers_.weight_decay[k]);
  const T decay = static_cast<T>(1.0 - lr * hypers_.weight_decay[k]);
  const T w1 = static_cast<T>(1.0 - beta1);
  const T b2 = static_cast<T>(beta2);
  const T c2 = static_cast<T>(1.0 - beta2);
  const T eps = static_cast<T>(hypers_.eps[k]);
  const T bc2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(beta2, steps)));
  const T neg_step_size = static_cast<T>(-(lr / (1.0 - std::pow(beta1, steps))));
  for (int64_t j = 0; j < P_; ++j) {
    T d = maximize_ ? -grad[j] : grad[j];
    last[j] = grad[j];
    T w = p[j];
    if (use_wd) {
      if (decoupled_)
        w = w * decay;
      else
        d = d + wd * w;
    }
    const T avg = lerp(m[j], d, w1);
    T sq = v[j] * b2 + c2 * d * d;
    m[j] = avg;
    v[j] = sq;
    if (vmax != nullptr) {
      sq = std::max(vmax[j], sq);
      vmax[j] = sq;
    }
    const T denom = std::sqrt(sq) / bc2_sqrt + eps;
    p[j] = w + neg_step_size * (avg / denom);
  }
}

}  // namespace hotloop
