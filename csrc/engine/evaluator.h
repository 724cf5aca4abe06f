// Evaluator: batched no-grad evaluation of captured forward+metric graphs over data on its device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "engine/interrupt.h"
#include "engine/op_graph.h"

namespace hotloop {

class Evaluator {
 public:
  // graphs: one per batch size a pass visits (batch_size, and the smaller last batch if any), each taking
  // (model_tensors..., data...) and returning one 0-dim batch mean per metric.
  // model_tensors: the parameters and buffers the graphs read. data: aligned tensors, samples first,
  // sliced into consecutive batches without copying.
  Evaluator(std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> graphs, std::vector<at::Tensor> model_tensors,
            std::vector<at::Tensor> data, int64_t batch_size);

  // Points the graphs at other parameter and buffer tensors laid out like the captured ones.
  void bind(std::vector<at::Tensor> model_tensors);
  // One pass over the data: each metric's sample-weighted mean over the batches, summed in float64 on
  // the metrics' device and read with one synchronisation. `poll` runs between batches and may throw to
  // stop the pass.
  std::vector<double> run(const PollFn& poll = {});

  int64_t num_samples() const { return num_samples_; }
  int64_t batch_size() const { return batch_size_; }
  int64_t num_metrics() const { return num_metrics_; }
  // Batches run over this evaluator's life (lets tests see that a pass ran natively).
  int64_t batches_run() const { return batches_run_; }

 private:
  OpGraph& graph_for(int64_t size);

  std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> graphs_;
  std::vector<at::Tensor> model_tensors_;
  std::vector<at::Tensor> data_;
  int64_t batch_size_;
  int64_t num_samples_;
  int64_t num_metrics_;
  int64_t batches_run_ = 0;
};

}  // namespace hotloop
