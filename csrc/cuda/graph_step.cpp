// GraphStep: per step one index copy and one graph replay, no synchronisation; one read per window.
#include "cuda/graph_step.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cmath>

namespace hotloop {

GraphStep::GraphStep(std::vector<std::shared_ptr<at::cuda::CUDAGraph>> graphs, std::vector<at::Tensor> index_buffers,
                     at::Tensor sums, at::Tensor found_inf, bool guard_nonfinite,
                     std::vector<at::Tensor> keep_alive)
    : graphs_(std::move(graphs)),
      index_buffers_(std::move(index_buffers)),
      sums_(std::move(sums)),
      found_inf_(std::move(found_inf)),
      captured_guard_(guard_nonfinite),
      keep_alive_(std::move(keep_alive)) {
  TORCH_CHECK(!graphs_.empty(), "GraphStep needs at least one graph");
  TORCH_CHECK(graphs_.size() == index_buffers_.size(), "GraphStep needs one index buffer per graph, got ",
              index_buffers_.size(), " for ", graphs_.size(), " graphs");
  for (size_t i = 0; i < graphs_.size(); ++i) {
    TORCH_CHECK(graphs_[i] != nullptr, "graph ", i, " is None");
    const at::Tensor& index = index_buffers_[i];
    TORCH_CHECK(index.defined() && index.is_cuda() && index.dim() == 1 && index.scalar_type() == at::kLong &&
                    index.is_contiguous(),
                "index buffer ", i, " must be a contiguous 1-d long CUDA tensor");
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK(index_buffers_[j].size(0) != index.size(0), "two graphs for batches of ", index.size(0),
                  " samples");
    }
  }
  TORCH_CHECK(sums_.defined() && sums_.is_cuda() && sums_.scalar_type() == at::kDouble && sums_.dim() == 1 &&
                  sums_.size(0) >= 2,
              "sums must be a 1-d float64 CUDA tensor of at least 2 elements (loss sum, applied steps)");
  TORCH_CHECK(found_inf_.defined() && found_inf_.is_cuda() && found_inf_.scalar_type() == at::kFloat &&
                  found_inf_.numel() == 1,
              "found_inf must be a one-element float32 CUDA tensor");
}

void GraphStep::begin_window(bool guard_nonfinite) {
  // The guard is part of the captured graphs (found_inf goes to the optimizer or not).
  TORCH_CHECK(guard_nonfinite == captured_guard_, "the graphs were captured with the non-finite guard ",
              captured_guard_ ? "on" : "off", "; it cannot be switched ", guard_nonfinite ? "on" : "off",
              " afterwards");
  sums_.zero_();
  found_inf_.zero_();
}

StepOutcome GraphStep::run(Dataset& data) {
  const at::Tensor indices = data.next_indices();
  const int64_t count = indices.size(0);
  for (size_t i = 0; i < graphs_.size(); ++i) {
    const at::Tensor& buffer = index_buffers_[i];
    if (buffer.size(0) != count) continue;
    TORCH_CHECK(indices.device() == buffer.device() && indices.scalar_type() == at::kLong &&
                    indices.is_contiguous(),
                "the batch's indices must be a contiguous long tensor on ", buffer.device());
    // A plain async copy on the stream the replay runs on: the one per-step operation besides the replay,
    // kept clear of the dispatcher.
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buffer.device().index());
    C10_CUDA_CHECK(cudaMemcpyAsync(buffer.data_ptr(), indices.const_data_ptr(), count * sizeof(int64_t),
                                   cudaMemcpyDeviceToDevice, stream));
    graphs_[i]->replay();
    ++replays_;
    StepOutcome outcome;
    outcome.samples = count;
    return outcome;
  }
  TORCH_CHECK(false, "no graph was captured for a batch of ", count, " samples");
}

WindowTotals GraphStep::end_window() {
  // The window's one synchronisation.
  const at::Tensor host = at::cat({sums_, found_inf_.reshape({1}).to(at::kDouble)}).cpu();
  const double* values = host.const_data_ptr<double>();
  const int64_t n = host.size(0);
  WindowTotals window;
  window.loss_sum = values[0];
  window.applied_steps = std::llround(values[1]);
  for (int64_t i = 2; i < n - 1; ++i) window.metric_sums.push_back(values[i]);
  window.nonfinite = values[n - 1] != 0.0;
  return window;
}

}  // namespace hotloop
