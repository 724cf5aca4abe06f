// PythonStep: the universal fallback, one call into a Python training step per batch.
#pragma once

#include <pybind11/pybind11.h>

#include "engine/step.h"

namespace hotloop {

class PythonStep final : public HostStep {
 public:
  explicit PythonStep(pybind11::function step_fn);
  ~PythonStep() override;
  // step_fn(*batch) returns the loss tensor, or a tuple (loss, metric, ...) of 0-dim tensors.
  at::Tensor run(const std::vector<at::Tensor>& batch) override;
  const std::vector<at::Tensor>& last_metrics() const override { return metrics_; }

 private:
  pybind11::function step_fn_;
  std::vector<at::Tensor> metrics_;
};

}  // namespace hotloop
