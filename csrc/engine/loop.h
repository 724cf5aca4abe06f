// Loop: runs shuffle -> gather -> step for a window of steps with no Python, returning the window's stats.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "data/dataset.h"
#include "engine/step.h"

namespace hotloop {

struct WindowStats {
  double loss_sum = 0.0;  // sum over steps of (batch mean loss * batch samples)
  int64_t samples = 0;
  int64_t steps = 0;
  int64_t epochs_completed = 0;
  double wall_time_sec = 0.0;
  bool epoch_ended = false;  // the window stopped exactly at an epoch boundary
  std::vector<double> metric_sums;  // per train metric: sum over steps of (batch mean * batch samples)
  int64_t nonfinite_step = -1;  // 1-based index (over the loop's life) of a step whose loss was not finite
};

class Loop {
 public:
  Loop(std::shared_ptr<Dataset> dataset, std::shared_ptr<Step> step);
  ~Loop();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  // Runs up to max_steps steps (crossing epoch ends), or until the current epoch ends when
  // stop_at_epoch_end is set. Must be called with the GIL held; releases it while training and
  // re-takes it every few milliseconds only to check for Ctrl-C.
  WindowStats run(int64_t max_steps, bool stop_at_epoch_end);

  // With the guard on, a step whose loss is not finite is not applied and ends the window; the stats
  // report it in nonfinite_step.
  void set_guard_nonfinite(bool guard);

  // Asks a running window to stop with KeyboardInterrupt after the step in progress (safe from a
  // signal handler: it only sets a flag).
  void request_interrupt() { interrupt_requested_.store(true); }
  void clear_interrupt() { interrupt_requested_.store(false); }

  Dataset& dataset() { return *dataset_; }
  // Safe to read from another thread while a window runs (progress bars poll it).
  int64_t total_steps() const { return total_steps_.load(); }
  // Loops alive in this process (lets tests prove that closing a stream frees its native state).
  static int64_t live_count() { return live_count_.load(); }

 private:
  void accumulate_metrics(int64_t batch_samples);
  // Reads a device-resident step's window (its one synchronisation) into stats.
  void settle_device_window(WindowStats& stats, const std::vector<int64_t>& batch_samples_issued);

  std::shared_ptr<Dataset> dataset_;
  std::shared_ptr<Step> step_;
  WindowSum loss_sum_;
  std::vector<WindowSum> metric_sums_;
  std::atomic<int64_t> total_steps_{0};
  std::atomic<bool> interrupt_requested_{false};
  static std::atomic<int64_t> live_count_;
};

}  // namespace hotloop
