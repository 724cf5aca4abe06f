// Loop: the native inner loop. Loss is accumulated on the device and read once per window.
#include "engine/loop.h"
#include "engine/signal_check.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <cmath>

namespace hotloop {
namespace py = pybind11;

namespace {
[[noreturn]] void raise_keyboard_interrupt() {
  py::gil_scoped_acquire gil;
  PyErr_SetNone(PyExc_KeyboardInterrupt);
  throw py::error_already_set();
}
}  // namespace

std::atomic<int64_t> Loop::live_count_{0};

Loop::Loop(std::shared_ptr<Dataset> dataset, std::shared_ptr<Step> step)
    : dataset_(std::move(dataset)), step_(std::move(step)) {
  TORCH_CHECK(dataset_ != nullptr, "Loop needs a dataset");
  TORCH_CHECK(step_ != nullptr, "Loop needs a step");
  ++live_count_;
}

Loop::~Loop() { --live_count_; }

void Loop::set_guard_nonfinite(bool guard) { step_->set_guard_nonfinite(guard); }

WindowStats Loop::run(int64_t max_steps, bool stop_at_epoch_end) {
  TORCH_CHECK(max_steps >= 1, "max_steps must be >= 1, got ", max_steps);
  using Clock = std::chrono::steady_clock;
  WindowStats stats;
  const auto start = Clock::now();
  const int64_t epochs_before = dataset_->epochs_completed();
  {
    py::gil_scoped_release no_gil;
    loss_sum_.reset();
    for (auto& sum : metric_sums_) sum.reset();
    const bool guard = step_->guard_nonfinite();
    const bool on_device = step_->takes_indices();
    std::vector<int64_t> batch_samples_issued;  // device-resident steps: each step's batch size, in order
    if (on_device) step_->begin_window();
    SignalCheck signals;
    while (stats.steps < max_steps) {
      int64_t batch_samples = 0;
      if (on_device) {
        at::Tensor indices = dataset_->next_indices();
        batch_samples = indices.size(0);
        step_->run_indices(indices);
        batch_samples_issued.push_back(batch_samples);
      } else {
        auto batch = dataset_->next_batch();
        batch_samples = batch.front().size(0);
        at::Tensor loss = step_->run(batch);
        if (guard && !loss_is_finite(loss)) {
          // The step left the model untouched; the batch is consumed but not counted as an update.
          stats.nonfinite_step = total_steps_ + 1;
          break;
        }
        loss_sum_.add(loss, static_cast<double>(batch_samples));
        accumulate_metrics(batch_samples);
      }
      stats.samples += batch_samples;
      ++stats.steps;
      ++total_steps_;
      if (interrupt_requested_.exchange(false)) raise_keyboard_interrupt();
      if (stop_at_epoch_end && dataset_->epoch_finished()) break;
      signals.poll();  // runs Python's handlers every few ms; ours calls request_interrupt()
      if (interrupt_requested_.exchange(false)) raise_keyboard_interrupt();
    }
    if (on_device) {
      settle_device_window(stats, batch_samples_issued);
    } else {
      stats.loss_sum = loss_sum_.total();
      for (const auto& sum : metric_sums_) stats.metric_sums.push_back(sum.total());
    }
  }
  stats.epoch_ended = dataset_->epoch_finished();
  stats.epochs_completed = dataset_->epochs_completed() - epochs_before;
  stats.wall_time_sec = std::chrono::duration<double>(Clock::now() - start).count();
  return stats;
}

void Loop::settle_device_window(WindowStats& stats, const std::vector<int64_t>& batch_samples_issued) {
  DeviceWindow window = step_->end_window();
  stats.loss_sum = window.loss_sum;
  stats.metric_sums = std::move(window.metric_sums);
  if (!window.nonfinite) return;
  // The steps after the first non-finite loss were issued but skipped on the device: count only the
  // applied ones (their batches are consumed, as the eager guard consumes the offending batch).
  const int64_t issued = static_cast<int64_t>(batch_samples_issued.size());
  const int64_t applied = std::min(window.applied_steps, issued);
  total_steps_ -= issued - applied;
  stats.steps = applied;
  stats.samples = 0;
  for (int64_t i = 0; i < applied; ++i) stats.samples += batch_samples_issued[i];
  stats.nonfinite_step = total_steps_ + 1;
}

void Loop::accumulate_metrics(int64_t batch_samples) {
  const auto metrics = step_->last_metrics();
  if (metric_sums_.size() != metrics.size()) metric_sums_.assign(metrics.size(), WindowSum());
  for (size_t i = 0; i < metrics.size(); ++i) metric_sums_[i].add(metrics[i], static_cast<double>(batch_samples));
}

}  // namespace hotloop
