// WindowAccount: host doubles read in place on CPU; on an accelerator a handful of device ops per step (one
// kernel on CUDA) and one read at the window's end.
#include "engine/window_account.h"

#include <cmath>

#ifdef HOTLOOP_WITH_CUDA
#include "cuda/step_accounting.h"
#endif

namespace hotloop {

void WindowAccount::begin(bool guard_nonfinite) {
  guard_ = guard_nonfinite;
  loss_sum_.reset();
  for (auto& sum : metric_sums_) sum.reset();
  applied_ = 0;
  nonfinite_ = false;
  sums_ = at::Tensor();
  flag_ = at::Tensor();
  found_inf_ = at::Tensor();
  skip_ = at::Tensor();
}

bool WindowAccount::add(const at::Tensor& loss, const std::vector<at::Tensor>& metrics, int64_t samples) {
  const auto weight = static_cast<double>(samples);
  if (on_device_) {
    add_on_device(loss, metrics, weight);
    return true;
  }
  if (guard_ && !loss_is_finite(loss)) {
    nonfinite_ = true;
    return false;
  }
  loss_sum_.add(loss, weight);
  if (metric_sums_.size() != metrics.size()) metric_sums_.assign(metrics.size(), WindowSum());
  for (size_t i = 0; i < metrics.size(); ++i) metric_sums_[i].add(metrics[i], weight);
  ++applied_;
  return true;
}

void WindowAccount::add_on_device(const at::Tensor& loss, const std::vector<at::Tensor>& metrics, double weight) {
  TORCH_CHECK(loss.numel() == 1, "the loss must be a single value, got shape ", loss.sizes());
  const auto num_values = static_cast<int64_t>(2 + metrics.size());
  const auto options = loss.options().dtype(at::kDouble);
  if (!sums_.defined()) {
    sums_ = at::zeros({num_values}, options);
    one_ = at::ones({}, options);
    flag_ = at::zeros({}, loss.options().dtype(at::kFloat));
    if (guard_) found_inf_ = flag_;
  }
  TORCH_CHECK(sums_.size(0) == num_values && sums_.device() == loss.device(), "a step returned ",
              metrics.size(), " train metrics on ", loss.device(), ", earlier steps of the window ",
              sums_.size(0) - 2, " on ", sums_.device());
#ifdef HOTLOOP_WITH_CUDA
  if (loss.is_cuda()) {
    std::optional<at::Tensor> stacked;
    if (!metrics.empty()) {
      std::vector<at::Tensor> values;
      for (const auto& m : metrics) values.push_back(m.detach().reshape({}).to(at::kDouble));
      stacked = at::stack(values);
    }
    account_step(loss.detach(), stacked, sums_, flag_, weight, guard_);
    if (guard_) skip_ = found_inf_.ne(0);
    return;
  }
#endif
  std::vector<at::Tensor> values{loss.detach().reshape({}).to(at::kDouble).mul(weight), one_};
  for (const auto& m : metrics) values.push_back(m.detach().reshape({}).to(at::kDouble).mul(weight));
  at::Tensor step_values = at::stack(values);
  if (!guard_) {
    sums_.add_(step_values);
    return;
  }
  at::maximum_out(found_inf_, found_inf_, at::isfinite(loss.detach().reshape({})).logical_not().to(at::kFloat));
  skip_ = found_inf_.ne(0);
  sums_.add_(step_values.masked_fill(skip_, 0.0));
}

WindowTotals WindowAccount::end() {
  WindowTotals totals;
  if (!on_device_) {
    totals.loss_sum = loss_sum_.total();
    for (const auto& sum : metric_sums_) totals.metric_sums.push_back(sum.total());
    totals.applied_steps = applied_;
    totals.nonfinite = nonfinite_;
    return totals;
  }
  if (!sums_.defined()) return totals;
  std::vector<at::Tensor> parts{sums_};
  if (found_inf_.defined()) parts.push_back(found_inf_.reshape({1}).to(at::kDouble));
  const at::Tensor host = at::cat(parts).cpu();
  const double* values = host.const_data_ptr<double>();
  const int64_t num_sums = sums_.size(0);
  totals.loss_sum = values[0];
  totals.applied_steps = static_cast<int64_t>(std::llround(values[1]));
  for (int64_t i = 2; i < num_sums; ++i) totals.metric_sums.push_back(values[i]);
  totals.nonfinite = found_inf_.defined() && values[num_sums] != 0.0;
  return totals;
}

}  // namespace hotloop
