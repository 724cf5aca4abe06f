// RowOptimizer: torch.optim's single-tensor SGD/Adam/AdamW maths per element, rows in parallel, one pass over
// each row's parameter, gradient and state. On x86 with AVX2 (checked at run time) float rows go eight at a
// time; other CPUs and float64 take the scalar loops.
#include "optim/row_optimizer.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HOTLOOP_ROW_AVX2 1
#include <immintrin.h>
#endif

namespace hotloop {

namespace {

inline float root(float x) { return std::sqrt(x); }
inline double root(double x) { return std::sqrt(x); }

template <typename T>
struct SgdRow {
  T* p;
  T* last;
  T* buf;
  const T* grad;
  T sign, wd, momentum, take, neg_lr;  // sign: -1 with maximize
  bool use_momentum, first, nesterov;
};

template <typename T>
struct AdamRow {
  T* p;
  T* last;
  T* m;
  T* v;
  T* vmax;  // nullptr without amsgrad
  const T* grad;
  // sign: -1 with maximize; wd: Adam's (coupled) decay, 0 otherwise; decay: AdamW's factor, 1 otherwise.
  // Adding 0 * w and multiplying by 1 are exact, so one loop serves every flag.
  T sign, wd, decay, w1, b2, c2, eps, bc2_sqrt, neg_step_size;
  bool low_weight;  // w1 < 0.5: ATen lerp's first form
};

// The scalar element loops, the per-row choices as template arguments.
template <typename T, bool Momentum, bool First, bool Nesterov>
inline void sgd_loop(const SgdRow<T>& r, int64_t n) {
  T* __restrict p = r.p;
  T* __restrict last = r.last;
  T* __restrict buf = r.buf;
  const T* __restrict grad = r.grad;
  for (int64_t j = 0; j < n; ++j) {
    const T g = grad[j];
    last[j] = g;
    T d = r.sign * g + r.wd * p[j];
    if constexpr (Momentum) {
      const T b = First ? d : buf[j] * r.momentum + r.take * d;
      buf[j] = b;
      d = Nesterov ? d + r.momentum * b : b;
    }
    p[j] = p[j] + r.neg_lr * d;
  }
}

template <typename T, bool Amsgrad, bool Low>
inline void adam_loop(const AdamRow<T>& r, int64_t n) {
  T* __restrict p = r.p;
  T* __restrict last = r.last;
  T* __restrict m = r.m;
  T* __restrict v = r.v;
  T* __restrict vmax = r.vmax;
  const T* __restrict grad = r.grad;
  for (int64_t j = 0; j < n; ++j) {
    const T g = grad[j];
    last[j] = g;
    const T w0 = p[j];
    const T d = r.sign * g + r.wd * w0;
    const T w = w0 * r.decay;
    const T m0 = m[j];
    // ATen's CPU lerp, so the moving average rounds as torch.optim's exp_avg.lerp_ does
    const T avg = Low ? m0 + r.w1 * (d - m0) : d - (d - m0) * (T(1) - r.w1);
    T sq = v[j] * r.b2 + r.c2 * d * d;
    m[j] = avg;
    v[j] = sq;
    if constexpr (Amsgrad) {
      sq = vmax[j] > sq ? vmax[j] : sq;
      vmax[j] = sq;
    }
    const T denom = root(sq) / r.bc2_sqrt + r.eps;
    p[j] = w + r.neg_step_size * (avg / denom);
  }
}

template <typename T>
inline void sgd_elements(const SgdRow<T>& r, int64_t n) {
  if (!r.use_momentum)
    sgd_loop<T, false, false, false>(r, n);
  else if (r.first)
    r.nesterov ? sgd_loop<T, true, true, true>(r, n) : sgd_loop<T, true, true, false>(r, n);
  else
    r.nesterov ? sgd_loop<T, true, false, true>(r, n) : sgd_loop<T, true, false, false>(r, n);
}

template <typename T>
inline void adam_elements(const AdamRow<T>& r, int64_t n) {
  if (r.vmax != nullptr)
    r.low_weight ? adam_loop<T, true, true>(r, n) : adam_loop<T, true, false>(r, n);
  else
    r.low_weight ? adam_loop<T, false, true>(r, n) : adam_loop<T, false, false>(r, n);
}

#ifdef HOTLOOP_ROW_AVX2
template <typename Row>
Row shifted(Row r, int64_t by) {
  r.p += by;
  r.last += by;
  r.grad += by;
  if constexpr (std::is_same_v<Row, SgdRow<float>>) {
    r.buf += by;
  } else {
    r.m += by;
    r.v += by;
    if (r.vmax != nullptr) r.vmax += by;
  }
  return r;
}

// Eight floats at a time with the scalar loop's operations in the same order; the tail goes to that loop.
__attribute__((target("avx2"))) void sgd_avx2(const SgdRow<float>& r, int64_t n) {
  const __m256 sign = _mm256_set1_ps(r.sign), wd = _mm256_set1_ps(r.wd), momentum = _mm256_set1_ps(r.momentum);
  const __m256 take = _mm256_set1_ps(r.take), neg_lr = _mm256_set1_ps(r.neg_lr);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 g = _mm256_loadu_ps(r.grad + j);
    _mm256_storeu_ps(r.last + j, g);
    const __m256 w = _mm256_loadu_ps(r.p + j);
    __m256 d = _mm256_add_ps(_mm256_mul_ps(sign, g), _mm256_mul_ps(wd, w));
    if (r.use_momentum) {
      const __m256 b = r.first ? d
                               : _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(r.buf + j), momentum),
                                               _mm256_mul_ps(take, d));
      _mm256_storeu_ps(r.buf + j, b);
      d = r.nesterov ? _mm256_add_ps(d, _mm256_mul_ps(momentum, b)) : b;
    }
    _mm256_storeu_ps(r.p + j, _mm256_add_ps(w, _mm256_mul_ps(neg_lr, d)));
  }
  if (j < n) sgd_elements(shifted(r, j), n - j);
}

__attribute__((target("avx2"))) void adam_avx2(const AdamRow<float>& r, int64_t n) {
  const __m256 sign = _mm256_set1_ps(r.sign), wd = _mm256_set1_ps(r.wd), decay = _mm256_set1_ps(r.decay);
  const __m256 w1 = _mm256_set1_ps(r.w1), keep = _mm256_set1_ps(1.0f - r.w1), b2 = _mm256_set1_ps(r.b2);
  const __m256 c2 = _mm256_set1_ps(r.c2), eps = _mm256_set1_ps(r.eps), bc2_sqrt = _mm256_set1_ps(r.bc2_sqrt);
  const __m256 neg_step_size = _mm256_set1_ps(r.neg_step_size);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 g = _mm256_loadu_ps(r.grad + j);
    _mm256_storeu_ps(r.last + j, g);
    const __m256 w0 = _mm256_loadu_ps(r.p + j);
    const __m256 d = _mm256_add_ps(_mm256_mul_ps(sign, g), _mm256_mul_ps(wd, w0));
    const __m256 w = _mm256_mul_ps(w0, decay);
    const __m256 m0 = _mm256_loadu_ps(r.m + j);
    const __m256 diff = _mm256_sub_ps(d, m0);
    const __m256 avg = r.low_weight ? _mm256_add_ps(m0, _mm256_mul_ps(w1, diff))
                                    : _mm256_sub_ps(d, _mm256_mul_ps(diff, keep));
    __m256 sq = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(r.v + j), b2), _mm256_mul_ps(_mm256_mul_ps(c2, d), d));
    _mm256_storeu_ps(r.m + j, avg);
    _mm256_storeu_ps(r.v + j, sq);
    if (r.vmax != nullptr) {
      sq = _mm256_max_ps(_mm256_loadu_ps(r.vmax + j), sq);
      _mm256_storeu_ps(r.vmax + j, sq);
    }
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(sq), bc2_sqrt), eps);
    _mm256_storeu_ps(r.p + j, _mm256_add_ps(w, _mm256_mul_ps(neg_step_size, _mm256_div_ps(avg, denom))));
  }
  if (j < n) adam_elements(shifted(r, j), n - j);
}
#endif

bool cpu_has_avx2() {
#ifdef HOTLOOP_ROW_AVX2
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
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
      decoupled_(decoupled),
      avx2_(cpu_has_avx2()) {
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
  bool& fresh = state_[1].mutable_data_ptr<bool>()[k];
  SgdRow<T> r{param_.mutable_data_ptr<T>() + k * P_,
              last_grad_.mutable_data_ptr<T>() + k * P_,
              state_[0].mutable_data_ptr<T>() + k * P_,
              grad,
              static_cast<T>(maximize_ ? -1.0 : 1.0),
              static_cast<T>(hypers_.weight_decay[k]),
              static_cast<T>(hypers_.momentum[k]),
              static_cast<T>(1.0 - hypers_.dampening[k]),
              static_cast<T>(-hypers_.lr[k]),
              hypers_.momentum[k] != 0.0,
              fresh,
              nesterov_};
#ifdef HOTLOOP_ROW_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_) {
      sgd_avx2(r, P_);
      fresh = false;
      return;
    }
  }
#endif
  sgd_elements(r, P_);
  fresh = false;
}

template <typename T>
void RowOptimizer::adam_row(int64_t k, const T* grad) {
  double& steps = state_[2].mutable_data_ptr<double>()[k];
  steps += 1.0;
  const double lr = hypers_.lr[k], beta1 = hypers_.beta1[k], beta2 = hypers_.beta2[k];
  AdamRow<T> r{param_.mutable_data_ptr<T>() + k * P_,
               last_grad_.mutable_data_ptr<T>() + k * P_,
               state_[0].mutable_data_ptr<T>() + k * P_,
               state_[1].mutable_data_ptr<T>() + k * P_,
               amsgrad_ ? state_[3].mutable_data_ptr<T>() + k * P_ : nullptr,
               grad,
               static_cast<T>(maximize_ ? -1.0 : 1.0),
               static_cast<T>(decoupled_ ? 0.0 : hypers_.weight_decay[k]),
               static_cast<T>(decoupled_ ? 1.0 - lr * hypers_.weight_decay[k] : 1.0),
               static_cast<T>(1.0 - beta1),
               static_cast<T>(beta2),
               static_cast<T>(1.0 - beta2),
               static_cast<T>(hypers_.eps[k]),
               static_cast<T>(std::sqrt(1.0 - std::pow(beta2, steps))),
               static_cast<T>(-(lr / (1.0 - std::pow(beta1, steps)))),
               1.0 - beta1 < 0.5};
#ifdef HOTLOOP_ROW_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_) {
      adam_avx2(r, P_);
      return;
    }
  }
#endif
  adam_elements(r, P_);
}

}  // namespace hotloop
