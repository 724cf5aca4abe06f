// PythonStep: the universal fallback, one call into a Python training step per batch.
#pragma once

#include <pybind11/pybind11.h>

#include "engine/step.h"

namespace hotloop {

class PythonStep final : public Step {
 public:
  explicit PythonStep(pybind11::function step_fn);
  ~PythonStep() override;
  at::Tensor run(const std::vector<at::Tensor>& batch) override;

 private:
  pybind11::function step_fn_;
};

}  // namespace hotloop
