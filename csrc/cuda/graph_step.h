// GraphStep: a whole training step (gather, forward, loss, backward, optimizer step, window sums) captured
// as CUDA graphs by hotloop.graph and replayed from C++, one graph per batch size.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/step.h"

namespace hotloop {

class GraphStep final : public DeviceStep {
 public:
  // graphs[i] trains on a batch of index_buffers[i].size(0) samples whose indices it reads from
  // index_buffers[i] (long, on the graph's device). Every replay adds into sums = [loss sum, applied
  // steps, metric sums...] (float64) and, when captured with the non-finite guard, raises found_inf
  // (float32, one element) at a non-finite loss, after which the captured optimizer skips its updates.
  // keep_alive: the other tensors the graphs read or write by address (data, batch buffers, lr), held
  // for as long as the graphs may replay.
  GraphStep(std::vector<std::shared_ptr<at::cuda::CUDAGraph>> graphs, std::vector<at::Tensor> index_buffers,
            at::Tensor sums, at::Tensor found_inf, bool guard_nonfinite, std::vector<at::Tensor> keep_alive);

  // The guard must be the one the graphs were captured with.
  void begin_window(bool guard_nonfinite) override;
  // Copies the next batch's sample indices into the index buffer of its size and replays that graph.
  StepOutcome run(Dataset& data) override;
  WindowTotals end_window() override;

  int64_t replays() const { return replays_; }

 private:
  std::vector<std::shared_ptr<at::cuda::CUDAGraph>> graphs_;
  std::vector<at::Tensor> index_buffers_;
  at::Tensor sums_;
  at::Tensor found_inf_;
  bool captured_guard_;
  std::vector<at::Tensor> keep_alive_;
  int64_t replays_ = 0;
};

}  // namespace hotloop
