// Loop: the native inner loop, with one path per kind of step.
#include "engine/loop.h"

#include <algorithm>

namespace hotloop {

std::atomic<int64_t> Loop::live_count_{0};

Loop::Loop(std::shared_ptr<Dataset> dataset, std::shared_ptr<HostStep> step)
    : dataset_(std::move(dataset)), host_step_(std::move(step)) {
  TORCH_CHECK(dataset_ != nullptr, "Loop needs a dataset");
  TORCH_CHECK(host_step_ != nullptr, "Loop needs a step");
  ++live_count_;
}

Loop::Loop(std::shared_ptr<Dataset> dataset, std::shared_ptr<DeviceStep> step)
    : dataset_(std::move(dataset)), device_step_(std::move(step)) {
  TORCH_CHECK(dataset_ != nullptr, "Loop needs a dataset");
  TORCH_CHECK(device_step_ != nullptr, "Loop needs a step");
  ++live_count_;
}

Loop::~Loop() { --live_count_; }

WindowStats Loop::run(int64_t max_steps, bool stop_at_epoch_end, const PollFn& poll) {
  TORCH_CHECK(max_steps >= 1, "max_steps must be >= 1, got ", max_steps);
  return host_step_ ? run_host(max_steps, stop_at_epoch_end, poll) : run_device(max_steps, stop_at_epoch_end, poll);
}

bool Loop::window_ends(bool stop_at_epoch_end, const PollFn& poll) {
  if (interrupt_requested_.exchange(false)) throw Interrupted();
  if (stop_at_epoch_end && dataset_->epoch_finished()) return true;
  if (poll) poll();  // Python's handlers run here; ours calls request_interrupt()
  if (interrupt_requested_.exchange(false)) throw Interrupted();
  return false;
}

WindowStats Loop::run_host(int64_t max_steps, bool stop_at_epoch_end, const PollFn& poll) {
  WindowStats stats;
  loss_sum_.reset();
  for (auto& sum : metric_sums_) sum.reset();
  while (stats.steps < max_steps) {
    auto batch = dataset_->next_batch();
    const int64_t batch_samples = batch.front().size(0);
    const at::Tensor loss = host_step_->run(batch);
    if (guard_nonfinite_ && !loss_is_finite(loss)) {
      // The step left the model untouched; the batch is consumed but not counted as an update.
      stats.nonfinite_step = total_steps_ + 1;
      break;
    }
    loss_sum_.add(loss, static_cast<double>(batch_samples));
    const auto& metrics = host_step_->last_metrics();
    if (metric_sums_.size() != metrics.size()) metric_sums_.assign(metrics.size(), WindowSum());
    for (size_t i = 0; i < metrics.size(); ++i) metric_sums_[i].add(metrics[i], static_cast<double>(batch_samples));
    stats.samples += batch_samples;
    ++stats.steps;
    ++total_steps_;
    if (window_ends(stop_at_epoch_end, poll)) break;
  }
  stats.loss_sum = loss_sum_.total();
  for (const auto& sum : metric_sums_) stats.metric_sums.push_back(sum.total());
  return stats;
}

WindowStats Loop::run_device(int64_t max_steps, bool stop_at_epoch_end, const PollFn& poll) {
  WindowStats stats;
  std::vector<int64_t> batch_samples_issued;  // each counted step's batch size, in order
  device_step_->begin_window(guard_nonfinite_);
  try {
    while (stats.steps < max_steps) {
      const StepOutcome outcome = device_step_->run(*dataset_);
      if (outcome.rejected) {
        stats.nonfinite_step = total_steps_ + 1;
        break;
      }
      batch_samples_issued.push_back(outcome.samples);
      stats.samples += outcome.samples;
      ++stats.steps;
      ++total_steps_;
      if (window_ends(stop_at_epoch_end, poll)) break;
    }
  } catch (...) {
    device_step_->end_window();
    throw;
  }
  settle(stats, device_step_->end_window(), batch_samples_issued);
  return stats;
}

void Loop::settle(WindowStats& stats, WindowTotals totals, const std::vector<int64_t>& batch_samples_issued) {
  stats.loss_sum = totals.loss_sum;
  stats.metric_sums = std::move(totals.metric_sums);
  if (!totals.nonfinite || stats.nonfinite_step >= 0) return;
  // The steps after the first non-finite loss were issued but skipped on the device: count only the
  // applied ones (their batches are consumed, as the host-side guard consumes the offending batch).
  const auto issued = static_cast<int64_t>(batch_samples_issued.size());
  const int64_t applied = std::min(totals.applied_steps, issued);
  total_steps_ -= issued - applied;
  stats.steps = applied;
  stats.samples = 0;
  for (int64_t i = 0; i < applied; ++i) stats.samples += batch_samples_issued[i];
  stats.nonfinite_step = total_steps_ + 1;
}

}  // namespace hotloop
