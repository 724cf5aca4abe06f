// Evaluator: slices consecutive batches, runs the graph for each size and accumulates on the device.
#include "engine/evaluator.h"

#include <algorithm>

namespace hotloop {

Evaluator::Evaluator(std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> graphs,
                     std::vector<at::Tensor> model_tensors, std::vector<at::Tensor> data, int64_t batch_size)
    : graphs_(std::move(graphs)), data_(std::move(data)), batch_size_(batch_size) {
  TORCH_CHECK(batch_size_ >= 1, "Evaluator: batch_size must be >= 1, got ", batch_size_);
  TORCH_CHECK(!data_.empty(), "Evaluator needs at least one data tensor");
  for (size_t i = 0; i < data_.size(); ++i) {
    TORCH_CHECK(data_[i].defined() && data_[i].dim() >= 1, "Evaluator: data tensor ", i,
                " needs a sample (first) dimension");
    TORCH_CHECK(data_[i].size(0) == data_.front().size(0), "Evaluator: data tensor ", i, " has ",
                data_[i].size(0), " samples, data tensor 0 has ", data_.front().size(0));
  }
  num_samples_ = data_.front().size(0);
  TORCH_CHECK(num_samples_ >= 1, "Evaluator needs at least one sample");
  TORCH_CHECK(!graphs_.empty(), "Evaluator needs at least one captured graph");
  const auto num_inputs = static_cast<int64_t>(model_tensors.size() + data_.size());
  num_metrics_ = graphs_.front().second ? graphs_.front().second->num_outputs() : 0;
  for (const auto& [size, graph] : graphs_) {
    TORCH_CHECK(graph != nullptr, "Evaluator: the graph for batch size ", size, " is missing");
    TORCH_CHECK(graph->num_inputs() == num_inputs, "Evaluator: the graph for batch size ", size, " takes ",
                graph->num_inputs(), " inputs, expected ", num_inputs, " (model tensors, then data tensors)");
    TORCH_CHECK(graph->num_outputs() == num_metrics_, "Evaluator: the graphs return different numbers of metrics");
  }
  TORCH_CHECK(num_metrics_ >= 1, "Evaluator: the graphs return no metric");
  // Fail here, not in the middle of a pass, when a batch size the pass visits has no graph.
  graph_for(std::min(batch_size_, num_samples_));
  if (num_samples_ % batch_size_ != 0 && num_samples_ > batch_size_) graph_for(num_samples_ % batch_size_);
  bind(std::move(model_tensors));
}

void Evaluator::bind(std::vector<at::Tensor> model_tensors) {
  TORCH_CHECK(model_tensors.size() + data_.size() == static_cast<size_t>(graphs_.front().second->num_inputs()),
              "Evaluator::bind needs ", graphs_.front().second->num_inputs() - static_cast<int64_t>(data_.size()),
              " model tensors, got ", model_tensors.size());
  model_tensors_ = std::move(model_tensors);
  for (auto& [size, graph] : graphs_)
    for (size_t i = 0; i < model_tensors_.size(); ++i) graph->bind_input(static_cast<int64_t>(i), model_tensors_[i]);
}

OpGraph& Evaluator::graph_for(int64_t size) {
  for (auto& [graph_size, graph] : graphs_)
    if (graph_size == size) return *graph;
  TORCH_CHECK(false, "Evaluator: no graph was captured for batches of ", size, " samples");
}

std::vector<double> Evaluator::run(const PollFn& poll) {
  std::vector<double> means;
  const auto first_data_input = static_cast<int64_t>(model_tensors_.size());
  std::vector<at::Tensor> sums;
  std::vector<at::Tensor> outputs;
  for (int64_t start = 0; start < num_samples_; start += batch_size_) {
    const int64_t size = std::min(batch_size_, num_samples_ - start);
    OpGraph& graph = graph_for(size);
    for (size_t i = 0; i < data_.size(); ++i)
      graph.bind_input(first_data_input + static_cast<int64_t>(i), data_[i].narrow(0, start, size));
    graph.run(outputs);
    if (sums.empty()) {
      for (int64_t m = 0; m < num_metrics_; ++m) {
        const auto& value = outputs[m];
        // mps has no float64
        const auto wide = value.device().type() == c10::DeviceType::MPS ? at::kFloat : at::kDouble;
        sums.push_back(at::zeros({}, value.options().dtype(wide)));
      }
    }
    for (int64_t m = 0; m < num_metrics_; ++m) {
      const auto& value = outputs[m];
      TORCH_CHECK(value.numel() == 1, "Evaluator: metric ", m, " returned ", value.numel(), " values for a batch");
      sums[m].add_(value.reshape({}), static_cast<double>(size));
    }
    ++batches_run_;
    if (poll) poll();
  }
  // Hold no batch views between passes.
  for (auto& [size, graph] : graphs_) {
    for (size_t i = 0; i < data_.size(); ++i) graph->bind_input(first_data_input + static_cast<int64_t>(i), at::Tensor());
  }
  const bool one_device = std::all_of(sums.begin(), sums.end(),
                                     [&](const at::Tensor& sum) { return sum.device() == sums.front().device(); });
  if (!one_device) {
    for (const auto& sum : sums) means.push_back(sum.item<double>() / static_cast<double>(num_samples_));
    return means;
  }
  // One synchronisation for all metrics.
  const at::Tensor totals = at::stack(sums).to(at::kDouble).div_(static_cast<double>(num_samples_)).cpu();
  const double* values = totals.data_ptr<double>();
  means.assign(values, values + num_metrics_);
  return means;
}

}  // namespace hotloop
