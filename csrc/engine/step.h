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
};

}  // namespace hotloop
