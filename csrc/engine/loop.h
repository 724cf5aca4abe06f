// Loop: runs shuffle -> gather -> step for a window of steps with no Python, returning the window's stats.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>

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
};

class Loop {
 public:
  Loop(std::shared_ptr<Dataset> dataset, std::shared_ptr<Step> step);

  // Runs up to max_steps steps (crossing epoch ends), or until the current epoch ends when
  // stop_at_epoch_end is set. Must be called with the GIL held; releases it while training and
  // re-takes it every few milliseconds only to check for Ctrl-C.
  WindowStats run(int64_t max_steps, bool stop_at_epoch_end);

  Dataset& dataset() { return *dataset_; }
  int64_t total_steps() const { return total_steps_; }

 private:
  std::shared_ptr<Dataset> dataset_;
  std::shared_ptr<Step> step_;
  at::Tensor loss_accumulator_;
  int64_t total_steps_ = 0;
};

}  // namespace hotloop
