// WindowAccount: a DeviceStep's bookkeeping for one window (loss and metric sums, applied steps, the
// non-finite guard), kept where the step's values live.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "engine/step.h"
#include "engine/window_sum.h"

namespace hotloop {

class WindowAccount {
 public:
  // on_device=false: every value is read on the host as it comes (in place for CPU floats, so free), and a
  // non-finite loss is known at once. on_device=true: sums and the guard's flag stay tensors on the values'
  // device, and a non-finite loss sets the sticky found_inf flag that the optimizer honours.
  explicit WindowAccount(bool on_device) : on_device_(on_device) {}

  bool on_device() const { return on_device_; }
  void begin(bool guard_nonfinite);
  // Adds one step's batch-mean loss and train metrics, weighted by its sample count. Returns false when the
  // step must not be applied and the host already knows it (host mode, guard on, loss not finite); on the
  // device a refused step returns true and is skipped through found_inf().
  bool add(const at::Tensor& loss, const std::vector<at::Tensor>& metrics, int64_t samples);
  // Device mode with the guard on: found_inf (0-dim float32, 1 once a loss was not finite) and skip
  // (its 0-dim bool form, as of the last add()). Undefined otherwise.
  const at::Tensor& found_inf() const { return found_inf_; }
  const at::Tensor& skip() const { return skip_; }
  // The window's totals; on the device this is the window's one synchronisation.
  WindowTotals end();

 private:
  void add_on_device(const at::Tensor& loss, const std::vector<at::Tensor>& metrics, double weight);

  bool on_device_;
  bool guard_ = false;
  // host mode
  WindowSum loss_sum_;
  std::vector<WindowSum> metric_sums_;
  int64_t applied_ = 0;
  bool nonfinite_ = false;
  // device mode
  at::Tensor sums_;  // [loss sum, applied steps, metric sums...], float64
  at::Tensor one_;
  at::Tensor flag_;       // the kernel's non-finite flag (never raised without the guard)
  at::Tensor found_inf_;  // flag_ when guarding, else undefined
  at::Tensor skip_;
};

}  // namespace hotloop
