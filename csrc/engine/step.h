// Step: what a Loop asks of an engine, one optimizer step on one gathered batch.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "engine/window_sum.h"

namespace hotloop {

// What a device-resident step measured over one window, read with one synchronisation at its end.
struct DeviceWindow {
  double loss_sum = 0.0;            // sum over applied steps of (batch mean loss * batch samples)
  std::vector<double> metric_sums;  // per train metric, likewise
  int64_t applied_steps = 0;        // steps whose update was applied
  bool nonfinite = false;           // a loss was not finite: that step and all later ones were skipped
};

// Whether a single-value loss is finite (read in place when it is a CPU float: the guard runs every step).
inline bool loss_is_finite(const at::Tensor& loss) {
  if (auto value = read_cpu_scalar(loss)) return std::isfinite(*value);
  return std::isfinite(loss.item<double>());
}

class Step {
 public:
  virtual ~Step() = default;
  // Trains on `batch` (aligned, batch-first) and returns the batch's mean loss as a 0-dim tensor on the
  // data's device, without synchronising. Called with the GIL released.
  virtual at::Tensor run(const std::vector<at::Tensor>& batch) = 0;

  // Batch means of the train metrics of the last run() (e.g. accuracy), as 0-dim device tensors in the
  // order the Python side asked for them; empty when no metrics were asked for.
  virtual std::vector<at::Tensor> last_metrics() const { return {}; }

  // When set, run() must not apply the update of a batch whose loss is not finite: the Loop then stops
  // the window with the model still at the last finite step.
  void set_guard_nonfinite(bool guard) { guard_nonfinite_ = guard; }

  // Device-resident steps (GraphStep) gather their own batch from its sample indices and keep the
  // window's sums and the non-finite guard on the device, so a window synchronises once: for them the
  // Loop calls begin_window(), then run_indices() per step instead of run(), then end_window().
  virtual bool takes_indices() const { return false; }
  virtual void begin_window() {}
  virtual void run_indices(const at::Tensor& /*indices*/) {
    TORCH_CHECK(false, "this step trains on gathered batches, not on sample indices");
  }
  virtual DeviceWindow end_window() {
    TORCH_CHECK(false, "this step keeps no window sums on the device");
  }
  bool guard_nonfinite() const { return guard_nonfinite_; }

 protected:
  bool guard_nonfinite_ = false;
};

}  // namespace hotloop
