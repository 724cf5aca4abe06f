// account_step: the bookkeeping at the end of a captured training step, in one kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace hotloop {

// Adds one step's loss and train metrics into the window sums = [loss sum, applied steps, metric
// sums...] (float64, on the loss's device), each weighted by the batch's sample count `weight`. With
// `guard`, a non-finite loss sets found_inf (float32, one element) to 1 and, once it is set, a step adds
// nothing: the optimizer, handed the same found_inf, skips its update too. Launches on the current
// stream, so it can be captured into a CUDA graph. metrics: float64, one value per train metric.
void account_step(const at::Tensor& loss, const std::optional<at::Tensor>& metrics, const at::Tensor& sums,
                  const at::Tensor& found_inf, double weight, bool guard);

}  // namespace hotloop
