// The two kinds of step a Loop runs: one whose losses the Loop reads as they come, and one that accounts
// its window on its own device and is read once at the window's end.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "data/dataset.h"

namespace hotloop {

// What a window's steps added up to, read at the window's end.
struct WindowTotals {
  double loss_sum = 0.0;            // sum over applied steps of (batch mean loss * batch samples)
  std::vector<double> metric_sums;  // per train metric, likewise
  int64_t applied_steps = 0;        // steps whose update was applied
  bool nonfinite = false;           // a loss was not finite: that step and all later ones were skipped
};

// Trains on a batch the Loop gathered and hands back its loss; the Loop reads it at once (the python
// engine, whose Python step has read the loss by then anyway). With the Loop's non-finite guard on, the
// step must leave a batch with a non-finite loss unapplied.
class HostStep {
 public:
  virtual ~HostStep() = default;
  // Returns the batch's mean loss as a 0-dim tensor. Called without the GIL.
  virtual at::Tensor run(const std::vector<at::Tensor>& batch) = 0;
  // Batch means of the train metrics of the last run(), as 0-dim tensors; empty when none were asked for.
  virtual const std::vector<at::Tensor>& last_metrics() const = 0;
};

struct StepOutcome {
  int64_t samples = 0;    // the batch's sample count
  bool rejected = false;  // the guard refused the batch on the host (its loss was not finite): stop here
};

// Takes its own batch from the Dataset and keeps the window's sums and the non-finite guard where its
// data lives (a host read in place on CPU, tensors on an accelerator), so a window synchronises once.
class DeviceStep {
 public:
  virtual ~DeviceStep() = default;
  virtual void begin_window(bool guard_nonfinite) = 0;
  virtual StepOutcome run(Dataset& data) = 0;
  // Also called when the window ends by an exception, to leave the model at a step boundary.
  virtual WindowTotals end_window() = 0;
};

}  // namespace hotloop
