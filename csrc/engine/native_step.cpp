// NativeStep: picks the graph for the batch size, runs it, hands the gradients to .grad and the optimizer.
#include "engine/native_step.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

namespace hotloop {

namespace {
bool params_on_cpu(const std::vector<at::Tensor>& params) {
  return params.empty() || params.front().device().is_cpu();
}
}  // namespace

NativeStep::NativeStep(std::vector<at::Tensor> params, std::vector<at::Tensor> state,
                       std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> graphs,
                       std::vector<std::vector<int64_t>> sample_shapes, std::vector<bool> accumulate,
                       std::shared_ptr<NativeOptimizer> optimizer, std::optional<bool> account_on_device)
    : params_(std::move(params)),
      state_(std::move(state)),
      graphs_(std::move(graphs)),
      sample_shapes_(std::move(sample_shapes)),
      accumulate_(std::move(accumulate)),
      optimizer_(std::move(optimizer)),
      account_(account_on_device.value_or(!params_on_cpu(params_))) {
  TORCH_CHECK(optimizer_ != nullptr, "NativeStep needs an optimizer");
  TORCH_CHECK(accumulate_.size() == params_.size(), "NativeStep: accumulate needs one flag per parameter, got ",
              accumulate_.size(), " for ", params_.size(), " parameters");
  check_graphs(graphs_);
  bind(params_, state_);
  grads_.resize(params_.size());
  metrics_.resize(graphs_.front().second->num_outputs() - params_.size() - 1);
}

void NativeStep::check_graphs(const std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>>& graphs) const {
  TORCH_CHECK(!graphs.empty(), "NativeStep needs at least one captured graph");
  const auto num_params = static_cast<int64_t>(params_.size());
  const auto num_inputs = num_params + static_cast<int64_t>(state_.size() + sample_shapes_.size());
  for (const auto& [batch_size, graph] : graphs) {
    TORCH_CHECK(graph != nullptr, "NativeStep: the graph for batch size ", batch_size, " is missing");
    TORCH_CHECK(graph->num_inputs() == num_inputs, "the graph for batch size ", batch_size, " takes ",
                graph->num_inputs(), " inputs, expected ", num_inputs);
    TORCH_CHECK(graph->num_outputs() >= num_params + 1, "the graph for batch size ", batch_size, " returns ",
                graph->num_outputs(), " values, expected at least ", num_params + 1,
                " (a gradient per parameter, the loss, the train metrics)");
    TORCH_CHECK(graph->num_outputs() == graphs.front().second->num_outputs(),
                "the graphs for different batch sizes return different numbers of values");
  }
}

void NativeStep::set_graphs(std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> graphs) {
  check_graphs(graphs);
  TORCH_CHECK(graphs.front().second->num_outputs() == graphs_.front().second->num_outputs(),
              "NativeStep::set_graphs: the new graphs return ", graphs.front().second->num_outputs(),
              " values, the old ones ", graphs_.front().second->num_outputs());
  graphs_ = std::move(graphs);
  bind(params_, state_);
}

void NativeStep::bind(std::vector<at::Tensor> params, std::vector<at::Tensor> state) {
  TORCH_CHECK(params.size() == params_.size() && state.size() == state_.size(), "NativeStep::bind needs ",
              params_.size(), " parameters and ", state_.size(), " state tensors, got ", params.size(), " and ",
              state.size());
  params_ = std::move(params);
  state_ = std::move(state);
  const auto num_params = static_cast<int64_t>(params_.size());
  for (auto& [batch_size, graph] : graphs_) {
    for (int64_t i = 0; i < num_params; ++i) graph->bind_input(i, params_[i]);
    for (size_t i = 0; i < state_.size(); ++i) graph->bind_input(num_params + static_cast<int64_t>(i), state_[i]);
  }
}

void NativeStep::set_accumulate(std::vector<bool> accumulate) {
  TORCH_CHECK(accumulate.size() == params_.size(), "NativeStep: accumulate needs one flag per parameter, got ",
              accumulate.size(), " for ", params_.size(), " parameters");
  accumulate_ = std::move(accumulate);
}

OpGraph& NativeStep::graph_for(int64_t batch_size) {
  for (auto& [size, graph] : graphs_)
    if (size == batch_size) return *graph;
  TORCH_CHECK(false, "the native engine has no graph captured for batch size ", batch_size);
}

void NativeStep::check_batch(const std::vector<at::Tensor>& batch) const {
  TORCH_CHECK(batch.size() == sample_shapes_.size(), "the native step was captured for ", sample_shapes_.size(),
              " batch tensors, got ", batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    const auto sizes = batch[i].sizes();
    const auto& expected = sample_shapes_[i];
    TORCH_CHECK(sizes.size() == expected.size() + 1 && sizes.slice(1).equals(expected), "batch tensor ", i,
                " has shape ", sizes, ", the native step was captured for samples of shape ", expected);
  }
}

void NativeStep::set_window_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0, "NativeStep::set_window_threads needs a non-negative thread count, got ", threads);
  window_threads_ = threads;
}

void NativeStep::begin_window(bool guard_nonfinite) {
  account_.begin(guard_nonfinite);
  window_steps_ = 0;
  had_grad_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) had_grad_[i] = params_[i].grad().defined();
  // Last, so nothing after it can throw before the Loop is bound to call end_window().
  const int threads = at::get_num_threads();
  if (window_threads_ > 0 && threads > window_threads_) {
    saved_threads_ = threads;
    at::set_num_threads(static_cast<int>(window_threads_));
  }
}

StepOutcome NativeStep::run(Dataset& data) { return run_batch(data.next_batch()); }

StepOutcome NativeStep::run_batch(const std::vector<at::Tensor>& batch) {
  StepOutcome outcome;
  outcome.samples = batch.front().size(0);
  outcome.rejected = !train(batch);
  return outcome;
}

bool NativeStep::train(const std::vector<at::Tensor>& batch) {
  check_batch(batch);
  const int64_t batch_size = batch.front().size(0);
  OpGraph& graph = graph_for(batch_size);
  const auto first_batch_input = static_cast<int64_t>(params_.size() + state_.size());
  for (size_t i = 0; i < batch.size(); ++i) graph.bind_input(first_batch_input + static_cast<int64_t>(i), batch[i]);
  graph.run(outputs_);
  const size_t num_params = params_.size();
  for (size_t i = 0; i < metrics_.size(); ++i) metrics_[i] = outputs_[num_params + 1 + i];
  // A plain loop that skips a non-finite batch leaves .grad and the optimizer untouched.
  if (!account_.add(outputs_[num_params], metrics_, batch_size)) return false;

  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (size_t i = 0; i < num_params; ++i) set_grad(i, outputs_[i]);
  optimizer_->step(grads_, account_.found_inf());
  ++window_steps_;
  ++steps_;
  return true;
}

void NativeStep::set_grad(size_t i, const at::Tensor& grad) {
  at::Tensor& param = params_[i];
  at::Tensor& slot = param.mutable_grad();
  // Set once the guard has refused a step on the device: .grad keeps the last applied step's gradient.
  const at::Tensor& skip = account_.skip();
  if (accumulate_[i] && slot.defined()) {
    slot.add_(skip.defined() ? grad.masked_fill(skip, 0.0) : grad);
  } else {
    at::Tensor laid_out = grad;
    if (grad.strides() != param.strides() || grad.sizes() != param.sizes()) {
      // torch's gradient layout contract: .grad has the parameter's strides.
      laid_out = at::empty_strided(param.sizes(), param.strides(), param.options());
      laid_out.copy_(grad);
    }
    slot = skip.defined() && slot.defined() ? at::where(skip, slot, laid_out) : laid_out;
  }
  grads_[i] = slot;
}

WindowTotals NativeStep::end_window() {
  if (saved_threads_ > 0) {
    at::set_num_threads(saved_threads_);
    saved_threads_ = 0;
  }
  WindowTotals totals = account_.end();
  if (!account_.on_device() || !totals.nonfinite) return totals;
  const int64_t skipped = window_steps_ - totals.applied_steps;
  optimizer_->settle_window(skipped);
  steps_ -= skipped;
  window_steps_ = totals.applied_steps;
  if (totals.applied_steps == 0) {
    // A .grad first set by a refused step is not one a plain loop would have.
    for (size_t i = 0; i < params_.size(); ++i)
      if (!had_grad_[i]) params_[i].mutable_grad() = at::Tensor();
  }
  return totals;
}

}  // namespace hotloop
