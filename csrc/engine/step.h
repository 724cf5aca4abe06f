// Step: what a Loop asks of an engine, one optimizer step on one gathered batch.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace hotloop {

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
  bool guard_nonfinite() const { return guard_nonfinite_; }

 protected:
  bool guard_nonfinite_ = false;
};

}  // namespace hotloop
