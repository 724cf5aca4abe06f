// Loop: runs gather -> step for a window of steps with no Python, returning the window's stats.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "data/dataset.h"
#include "engine/interrupt.h"
#include "engine/step.h"
#include "engine/window_sum.h"

namespace hotloop {

struct WindowStats {
  double loss_sum = 0.0;  // sum over steps of (batch mean loss * batch samples)
  int64_t samples = 0;
  int64_t steps = 0;
  std::vector<double> metric_sums;  // per train metric: sum over steps of (batch mean * batch samples)
  int64_t nonfinite_step = -1;  // 1-based index (over the loop's life) of a step whose loss was not finite
};

class Loop {
 public:
  Loop(std::shared_ptr<Dataset> dataset, std::shared_ptr<HostStep> step);
  Loop(std::shared_ptr<Dataset> dataset, std::shared_ptr<DeviceStep> step);
  ~Loop();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  // Runs up to max_steps steps (crossing epoch ends), or until the current epoch ends when
  // stop_at_epoch_end is set. `poll` runs between steps and may throw to stop the window; a requested
  // interrupt throws Interrupted after the step in progress.
  WindowStats run(int64_t max_steps, bool stop_at_epoch_end, const PollFn& poll = {});

  // With the guard on, a step whose loss is not finite is not applied and ends the window; the stats
  // report it in nonfinite_step.
  void set_guard_nonfinite(bool guard) { guard_nonfinite_ = guard; }

  // Asks a running window to stop with Interrupted after the step in progress (safe from a signal
  // handler: it only sets a flag).
  void request_interrupt() { interrupt_requested_.store(true); }
  void clear_interrupt() { interrupt_requested_.store(false); }

  Dataset& dataset() { return *dataset_; }
  // Safe to read from another thread while a window runs (progress bars poll it).
  int64_t total_steps() const { return total_steps_.load(); }
  // Loops alive in this process (lets tests prove that closing a stream frees its native state).
  static int64_t live_count() { return live_count_.load(); }

 private:
  // The loss of each step read as it comes (HostStep).
  WindowStats run_host(int64_t max_steps, bool stop_at_epoch_end, const PollFn& poll);
  // The window accounted by the step on its device and read once at the end (DeviceStep).
  WindowStats run_device(int64_t max_steps, bool stop_at_epoch_end, const PollFn& poll);
  // After a counted step: true when the window ends here; throws on an interrupt.
  bool window_ends(bool stop_at_epoch_end, const PollFn& poll);
  void settle(WindowStats& stats, WindowTotals totals, const std::vector<int64_t>& batch_samples_issued);

  std::shared_ptr<Dataset> dataset_;
  std::shared_ptr<HostStep> host_step_;
  std::shared_ptr<DeviceStep> device_step_;
  bool guard_nonfinite_ = false;
  WindowSum loss_sum_;
  std::vector<WindowSum> metric_sums_;
  std::atomic<int64_t> total_steps_{0};
  std::atomic<bool> interrupt_requested_{false};
  static std::atomic<int64_t> live_count_;
};

}  // namespace hotloop
