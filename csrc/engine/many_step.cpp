// ManyStep: the common step (every model has a batch, every loss finite) is the joint graph plus one update
// graph; the rest (a model frozen, out of batches, or diverging) goes through the row-masked update.
#include "engine/many_step.h"

namespace hotloop {

namespace {

// The values of a small bool tensor on the host: read in place for a contiguous CPU tensor.
std::vector<bool> host_bools(const at::Tensor& values) {
  at::Tensor host = values;
  if (!host.device().is_cpu() || !host.is_contiguous() || host.scalar_type() != at::kBool)
    host = host.to(at::kCPU, at::kBool).contiguous();
  const bool* data = host.const_data_ptr<bool>();
  return std::vector<bool>(data, data + host.numel());
}

bool all_of(const std::vector<bool>& values) {
  for (bool v : values)
    if (!v) return false;
  return true;
}

void bind_all(OpGraph& graph, const std::vector<at::Tensor>& inputs, const char* what) {
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) == graph.num_inputs(), "ManyStep: the ", what, " graph takes ",
              graph.num_inputs(), " inputs, got ", inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) graph.bind_input(static_cast<int64_t>(i), inputs[i]);
}

}  // namespace

ManyStep::ManyStep(std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> step_graphs,
                   std::vector<at::Tensor> step_inputs, int64_t index_slot, at::Tensor applied, bool guard,
                   bool raise_on_nonfinite)
    : step_graphs_(std::move(step_graphs)),
      step_inputs_(std::move(step_inputs)),
      index_slot_(index_slot),
      applied_(std::move(applied)),
      guard_(guard),
      raise_(raise_on_nonfinite) {
  TORCH_CHECK(!step_graphs_.empty(), "ManyStep needs at least one captured step graph");
  TORCH_CHECK(index_slot_ >= 0 && index_slot_ + 1 < static_cast<int64_t>(step_inputs_.size()),
              "ManyStep: index_slot ", index_slot_, " is outside the ", step_inputs_.size(), " step inputs");
  TORCH_CHECK(applied_.defined() && applied_.dim() == 1 && applied_.scalar_type() == at::kLong,
              "ManyStep: applied must be a [K] int64 tensor");
  K_ = applied_.size(0);
  for (auto& [size, graph] : step_graphs_) {
    TORCH_CHECK(graph != nullptr, "ManyStep: the graph for batch size ", size, " is missing");
    TORCH_CHECK(graph->num_outputs() == 2, "ManyStep: the graph for batch size ", size, " returns ",
                graph->num_outputs(), " values, expected 2 (the flat gradient, the finite mask)");
    bind_all(*graph, step_inputs_, "step");
  }
  active_.assign(K_, true);
  nonfinite_.assign(K_, -1);
  set_active_mask();
}

void ManyStep::set_updates(std::shared_ptr<OpGraph> update_all, const std::vector<at::Tensor>& all_inputs,
                           std::shared_ptr<OpGraph> update_rows, const std::vector<at::Tensor>& rows_inputs,
                           at::Tensor fresh, at::Tensor needs_fresh) {
  TORCH_CHECK(update_all != nullptr && update_rows != nullptr, "ManyStep needs both update graphs");
  TORCH_CHECK(fresh.defined() == needs_fresh.defined(), "ManyStep: fresh and needs_fresh go together");
  bind_all(*update_all, all_inputs, "update_all");
  bind_all(*update_rows, rows_inputs, "update_rows");
  all_inputs_ = all_inputs;
  rows_inputs_ = rows_inputs;
  update_all_ = std::move(update_all);
  update_rows_ = std::move(update_rows);
  fresh_ = std::move(fresh);
  needs_fresh_ = std::move(needs_fresh);
  fast_ = !fresh_.defined() || !fresh_.logical_and(needs_fresh_).any().item<bool>();
}

void ManyStep::set_window(std::vector<at::Tensor> indices, std::vector<at::Tensor> taking,
                          std::vector<bool> active) {
  TORCH_CHECK(indices.size() == taking.size(), "ManyStep: ", indices.size(), " index tensors but ", taking.size(),
              " taking masks");
  TORCH_CHECK(static_cast<int64_t>(active.size()) == K_, "ManyStep: active needs ", K_, " flags, got ",
              active.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    TORCH_CHECK(indices[i].defined() && indices[i].dim() >= 1, "ManyStep: step ", i, " has no batch indices");
    graph_for(indices[i].size(-1));  // every batch size has its graph
    TORCH_CHECK(!taking[i].defined() || (taking[i].scalar_type() == at::kBool && taking[i].numel() == K_),
                "ManyStep: step ", i, "'s taking mask must be [K, 1] bool");
  }
  indices_ = std::move(indices);
  taking_ = std::move(taking);
  active_ = std::move(active);
  set_active_mask();
}

void ManyStep::set_active_mask() {
  num_active_ = 0;
  for (bool a : active_) num_active_ += a ? 1 : 0;
  auto mask = at::empty({K_, 1}, applied_.options().dtype(at::kBool).device(at::kCPU));
  bool* data = mask.mutable_data_ptr<bool>();
  for (int64_t k = 0; k < K_; ++k) data[k] = active_[k];
  active_mask_ = mask.to(applied_.device());
}

void ManyStep::bind_inputs() {
  for (auto& [size, graph] : step_graphs_) bind_all(*graph, step_inputs_, "step");
  if (update_all_ != nullptr) bind_all(*update_all_, all_inputs_, "update_all");
  if (update_rows_ != nullptr) bind_all(*update_rows_, rows_inputs_, "update_rows");
}

OpGraph& ManyStep::graph_for(int64_t batch_size) {
  for (auto& [size, graph] : step_graphs_)
    if (size == batch_size) return *graph;
  TORCH_CHECK(false, "fit_many has no stacked graph captured for batch size ", batch_size);
}

void ManyStep::begin_window(bool /*guard_nonfinite: fit_many's guard is per model, set at construction*/) {
  TORCH_CHECK(update_all_ != nullptr || row_optimizer_ != nullptr,
              "ManyStep: set_updates() or set_row_optimizer() must come before the first window");
  bind_inputs();
  position_ = 0;
  nonfinite_.assign(K_, -1);
  raised_model_ = raised_step_ = -1;
}

StepOutcome ManyStep::run(Dataset& /*data: the step graph gathers its own batch*/) {
  TORCH_CHECK(position_ < static_cast<int64_t>(indices_.size()), "ManyStep: the window's schedule has ",
              indices_.size(), " steps, the loop asked for more");
  const at::Tensor& index = indices_[position_];
  const at::Tensor& taking = taking_[position_];
  ++position_;
  StepOutcome outcome;
  outcome.samples = index.size(-1);
  if (num_active_ == 0) return outcome;
  const at::Tensor rows = taking.defined() ? active_mask_.logical_and(taking.reshape({K_, 1})) : active_mask_;
  const bool every_row = taking.defined() ? all_of(host_bools(rows)) : num_active_ == K_;
  OpGraph& graph = graph_for(outcome.samples);
  graph.bind_input(index_slot_, index);
  graph.bind_input(index_slot_ + 1, rows);
  graph.run(outputs_);
  const at::Tensor grad = outputs_[0];
  const at::Tensor finite = outputs_[1];
  const bool all_finite = !guard_ || all_of(host_bools(finite));
  if (every_row && all_finite && row_optimizer_ != nullptr) {
    row_optimizer_->step(grad, {});
    return outcome;
  }
  if (every_row && all_finite && fast_) {
    update_all_->bind_input(1, grad);
    update_all_->run(no_outputs_);
    return outcome;
  }
  outcome.rejected = !update_some(grad, finite, rows);
  return outcome;
}

bool ManyStep::update_some(const at::Tensor& grad, const at::Tensor& finite, at::Tensor rows) {
  if (guard_) {
    const std::vector<bool> ok = host_bools(finite);
    const std::vector<bool> on = host_bools(rows);
    std::vector<int64_t> bad;
    for (int64_t k = 0; k < K_; ++k)
      if (on[k] && !ok[k]) bad.push_back(k);
    if (!bad.empty()) {
      const at::Tensor applied = applied_.to(at::kCPU);
      const int64_t* counts = applied.const_data_ptr<int64_t>();
      if (raise_) {
        raised_model_ = bad.front();
        raised_step_ = counts[bad.front()] + 1;
      } else {
        for (int64_t k : bad) {
          nonfinite_[k] = counts[k] + 1;
          active_[k] = false;
        }
        set_active_mask();
      }
      rows = rows.logical_and(finite.reshape({K_, 1}));
    }
  }
  const bool go_on = raised_model_ < 0;  // raising: the other models take this step, then the window stops
  if (row_optimizer_ != nullptr) {
    row_optimizer_->step(grad, host_bools(rows));
    return go_on;
  }
  if (!at::any(rows).item<bool>()) return go_on;
  update_rows_->bind_input(1, grad);
  update_rows_->bind_input(2, rows);
  update_rows_->run(no_outputs_);
  if (fresh_.defined()) fast_ = !fresh_.logical_and(needs_fresh_).any().item<bool>();
  return go_on;
}

WindowTotals ManyStep::end_window() {
  // The per-model sums live in the step graph's own [K] tensors, read by fit_many at the window's end.
  WindowTotals totals;
  totals.applied_steps = position_;
  return totals;
}

}  // namespace hotloop
