// AotStep: fills the package's inputs (the user's tensors, the optimizer's state, this step's scalars) and
// keeps torch.optim's counters (step tensors, SGD's first-step buffers, the window's step count) moving.
#include "engine/aot_step.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cmath>

namespace hotloop {

namespace {
constexpr int64_t kSgdScalars = 5;   // lr, weight_decay, momentum, momentum now, 1 - dampening now
constexpr int64_t kAdamScalars = 9;  // lr, wd, 1-beta1, beta2, 1-beta2, step_size, sqrt(bc2), eps, 1-lr*wd

double step_count(const at::Tensor& step) {
  if (step.is_cpu() && step.scalar_type() == at::kFloat) return *step.const_data_ptr<float>();
  if (step.is_cpu() && step.scalar_type() == at::kDouble) return *step.const_data_ptr<double>();
  return step.item<double>();
}
}  // namespace

AotStep::AotStep(std::shared_ptr<NativeStep> native, std::vector<at::Tensor> params, std::vector<at::Tensor> buffers,
                 AotUpdate update, int64_t state_lists, int64_t num_metrics)
    : native_(std::move(native)),
      params_(std::move(params)),
      buffers_(std::move(buffers)),
      update_(update),
      state_lists_(state_lists),
      num_metrics_(num_metrics) {
  TORCH_CHECK(native_ != nullptr, "AotStep needs the native step");
  TORCH_CHECK(!params_.empty(), "AotStep needs the trainable parameters");
  TORCH_CHECK(state_lists_ >= 0 && state_lists_ <= 3, "AotStep: state_lists must be in [0, 3], got ", state_lists_);
  for (const auto& p : params_) {
    TORCH_CHECK(p.is_cpu(), "the aot engine runs on the CPU only, got a parameter on ", p.device());
    TORCH_CHECK(p.scalar_type() == params_.front().scalar_type(),
                "the aot engine needs all trainable parameters in one dtype");
  }
  const int64_t per_param = update_ == AotUpdate::SGD ? kSgdScalars : kAdamScalars;
  hyper_ = at::zeros({1 + per_param * static_cast<int64_t>(params_.size())},
                     params_.front().options().requires_grad(false));
  metrics_.resize(num_metrics_);
}

AotStep::~AotStep() = default;

void AotStep::add_package(int64_t batch_size, const std::string& path) {
  TORCH_CHECK(batch_size >= 1, "add_package: batch_size must be >= 1, got ", batch_size);
  // One runner, run on the calling thread: the Loop never calls a step from two threads at once.
  auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", true);
  for (auto& package : packages_) {
    if (package.batch_size == batch_size) {
      package.loader = std::move(loader);
      return;
    }
  }
  packages_.push_back(Package{batch_size, std::move(loader)});
}

void AotStep::clear_packages() { packages_.clear(); }

std::vector<int64_t> AotStep::package_batch_sizes() const {
  std::vector<int64_t> sizes;
  for (const auto& package : packages_) sizes.push_back(package.batch_size);
  return sizes;
}

void AotStep::bind(std::vector<at::Tensor> params, std::vector<at::Tensor> buffers) {
  TORCH_CHECK(params.size() == params_.size() && buffers.size() == buffers_.size(), "AotStep::bind needs ",
              params_.size(), " parameters and ", buffers_.size(), " buffers");
  native_->bind(params, buffers);
  params_ = std::move(params);
  buffers_ = std::move(buffers);
}

AotStep::Package* AotStep::package_for(int64_t batch_size) {
  for (auto& package : packages_)
    if (package.batch_size == batch_size) return &package;
  return nullptr;
}

void AotStep::collect_state() {
  const auto& groups = native_->optimizer()->groups();
  const size_t num_params = params_.size();
  slot_of_.assign(num_params, {SIZE_MAX, 0});
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& group = groups[gi];
    for (size_t i = 0; i < group.params.size(); ++i) {
      const auto j = static_cast<size_t>(group.grad_index[i]);
      TORCH_CHECK(j < num_params && group.params[i].is_same(params_[j]),
                  "the optimizer's parameters are not the ones the aot step was compiled for");
      slot_of_[j] = {gi, i};
    }
  }
  state_.assign(static_cast<size_t>(state_lists_) * num_params, at::Tensor());
  for (size_t j = 0; j < num_params; ++j) {
    const auto [gi, i] = slot_of_[j];
    TORCH_CHECK(gi != SIZE_MAX, "trainable parameter ", j, " is not stepped by the optimizer; the aot engine "
                "needs the optimizer to step every trainable parameter");
    const auto& group = groups[gi];
    std::vector<const std::vector<at::Tensor>*> lists;
    if (update_ == AotUpdate::SGD) {
      lists = {&group.momentum_buffers};
    } else {
      lists = {&group.exp_avgs, &group.exp_avg_sqs, &group.max_exp_avg_sqs};
    }
    for (int64_t k = 0; k < state_lists_; ++k) {
      const auto& list = *lists[static_cast<size_t>(k)];
      TORCH_CHECK(i < list.size() && list[i].defined(), "the optimizer state of parameter ", j,
                  " is missing a tensor the aot step was compiled for (its options changed?)");
      state_[static_cast<size_t>(k) * num_params + j] = list[i];
    }
  }
}

void AotStep::fill_hyper() {
  const auto& groups = native_->optimizer()->groups();
  const int64_t k = native_->optimizer()->steps_in_window();
  const int64_t per_param = update_ == AotUpdate::SGD ? kSgdScalars : kAdamScalars;
  std::vector<double> values(static_cast<size_t>(hyper_.numel()));
  values[0] = guard_ ? 1.0 : 0.0;
  for (size_t j = 0; j < params_.size(); ++j) {
    const auto [gi, i] = slot_of_[j];
    const auto& group = groups[gi];
    const double lr = group.lr_per_step.empty() ? group.lr : group.lr_per_step[static_cast<size_t>(k)];
    double* v = values.data() + 1 + static_cast<int64_t>(j) * per_param;
    v[0] = lr;
    v[1] = group.weight_decay;
    if (update_ == AotUpdate::SGD) {
      const double momentum =
          group.momentum_per_step.empty() ? group.momentum : group.momentum_per_step[static_cast<size_t>(k)];
      const bool is_new = group.momentum != 0.0 && group.buffer_is_new[i];
      v[2] = momentum;
      // torch.optim's first step sets the buffer to the gradient: 0 * zeros + 1 * gradient
      v[3] = is_new ? 0.0 : momentum;
      v[4] = is_new ? 1.0 : 1.0 - group.dampening;
    } else {
      const double beta1 =
          group.momentum_per_step.empty() ? group.beta1 : group.momentum_per_step[static_cast<size_t>(k)];
      const double step = step_count(group.steps[i]) + 1.0;
      const double bias_correction1 = 1.0 - std::pow(beta1, step);
      const double bias_correction2 = 1.0 - std::pow(group.beta2, step);
      v[2] = 1.0 - beta1;
      v[3] = group.beta2;
      v[4] = 1.0 - group.beta2;
      v[5] = lr / bias_correction1;
      v[6] = std::pow(bias_correction2, 0.5);
      v[7] = group.eps;
      v[8] = 1.0 - lr * group.weight_decay;
    }
  }
  if (hyper_.scalar_type() == at::kFloat) {
    float* out = hyper_.data_ptr<float>();
    for (size_t n = 0; n < values.size(); ++n) out[n] = static_cast<float>(values[n]);
  } else if (hyper_.scalar_type() == at::kDouble) {
    double* out = hyper_.data_ptr<double>();
    for (size_t n = 0; n < values.size(); ++n) out[n] = values[n];
  } else {
    hyper_.copy_(at::tensor(values, at::kDouble));
  }
}

void AotStep::begin_window(bool guard_nonfinite) {
  native_->begin_window(guard_nonfinite);
  guard_ = guard_nonfinite;
  account_.begin(guard_nonfinite);
  last_grads_.clear();
  inputs_.clear();
  if (packages_.empty()) return;  // a native window: the optimizer need not fit a package
  collect_state();
  inputs_.insert(inputs_.end(), params_.begin(), params_.end());
  inputs_.insert(inputs_.end(), buffers_.begin(), buffers_.end());
  inputs_.insert(inputs_.end(), state_.begin(), state_.end());
  inputs_.push_back(hyper_);
}

StepOutcome AotStep::run(Dataset& data) {
  auto batch = data.next_batch();
  StepOutcome outcome;
  outcome.samples = batch.front().size(0);
  Package* package = package_for(outcome.samples);
  // The package was compiled for contiguous batches (an unshuffled view of strided data is not).
  for (const auto& t : batch)
    if (!t.is_contiguous()) package = nullptr;
  if (package == nullptr) {
    last_grads_.clear();
    return native_->run_batch(batch);
  }
  fill_hyper();
  const size_t fixed = params_.size() + buffers_.size() + state_.size() + 1;
  inputs_.resize(fixed);
  inputs_.insert(inputs_.end(), batch.begin(), batch.end());
  std::vector<at::Tensor> outputs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    outputs = package->loader->run(inputs_);
  }
  TORCH_CHECK(static_cast<int64_t>(outputs.size()) ==
                  1 + num_metrics_ + static_cast<int64_t>(params_.size()),
              "the aot package returned ", outputs.size(), " values");
  for (int64_t m = 0; m < num_metrics_; ++m) metrics_[static_cast<size_t>(m)] = outputs[1 + static_cast<size_t>(m)];
  // The package applied the update only where the loss was finite (or the guard is off).
  if (!account_.add(outputs[0], metrics_, outcome.samples)) {
    outcome.rejected = true;
    return outcome;
  }
  native_->optimizer()->record_step();
  last_grads_.assign(outputs.begin() + 1 + num_metrics_, outputs.end());
  ++compiled_steps_;
  return outcome;
}

WindowTotals AotStep::end_window() {
  WindowTotals totals = native_->end_window();
  const WindowTotals own = account_.end();
  totals.loss_sum += own.loss_sum;
  totals.applied_steps += own.applied_steps;
  totals.nonfinite = totals.nonfinite || own.nonfinite;
  if (totals.metric_sums.size() < own.metric_sums.size()) totals.metric_sums.resize(own.metric_sums.size(), 0.0);
  for (size_t m = 0; m < own.metric_sums.size(); ++m) totals.metric_sums[m] += own.metric_sums[m];
  // .grad holds the last applied step's gradient, as after a plain loop's backward
  if (!last_grads_.empty()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t j = 0; j < params_.size(); ++j) {
      const at::Tensor& grad = last_grads_[j];
      at::Tensor laid_out = grad;
      if (grad.strides() != params_[j].strides()) {
        laid_out = at::empty_strided(params_[j].sizes(), params_[j].strides(), params_[j].options());
        laid_out.copy_(grad);
      }
      params_[j].mutable_grad() = laid_out;
    }
    last_grads_.clear();
  }
  return totals;
}

}  // namespace hotloop
