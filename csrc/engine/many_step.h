// ManyStep: one step of K stacked models (fit_many) as the Loop runs it: the window's precomputed batch
// indices, the stacked joint graph of the batch size, then one update of every model or of some rows, with a
// per-model non-finite freeze.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "engine/op_graph.h"
#include "engine/step.h"
#include "optim/row_optimizer.h"

namespace hotloop {

class ManyStep final : public DeviceStep {
 public:
  // step_graphs: one per batch size, each taking step_inputs with the batch indices at index_slot ([B]
  // shared or [K, B] per model) and the rows that take the step at index_slot + 1 ([K, 1] bool), and
  // returning (flat gradient [K, P], isfinite(loss) [K]); the graph itself adds the rows it counts to the
  // window's per-model sums, among them `applied` ([K] int64, the window's applied steps per model).
  // guard: a model whose loss is not finite is left unapplied and frozen (raise_on_nonfinite: the other
  // models take that step and the window stops there).
  ManyStep(std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> step_graphs,
           std::vector<at::Tensor> step_inputs, int64_t index_slot, at::Tensor applied, bool guard,
           bool raise_on_nonfinite);

  // The two update graphs and their inputs: update_all takes (flat, grad, ...) and updates every row;
  // update_rows takes (flat, grad, rows [K, 1] bool, ...) and leaves the other rows bitwise unchanged.
  // update_all may stand in for update_rows with every row on unless a row of `fresh` ([K, 1] bool, may be
  // undefined) is set where `needs_fresh` is (SGD's momentum buffer not created yet).
  void set_updates(std::shared_ptr<OpGraph> update_all, const std::vector<at::Tensor>& all_inputs,
                   std::shared_ptr<OpGraph> update_rows, const std::vector<at::Tensor>& rows_inputs,
                   at::Tensor fresh, at::Tensor needs_fresh);
  // The fused per-row update instead of the update graphs (optimizers built fused=True); nullptr: the graphs.
  void set_row_optimizer(std::shared_ptr<RowOptimizer> optimizer) { row_optimizer_ = std::move(optimizer); }
  // The window's steps, in order: indices[i] and taking[i] ([K, 1] bool, or undefined when every model has
  // a batch in step i), and which models train.
  void set_window(std::vector<at::Tensor> indices, std::vector<at::Tensor> taking, std::vector<bool> active);

  void begin_window(bool guard_nonfinite) override;
  StepOutcome run(Dataset& data) override;
  WindowTotals end_window() override;

  // Steps of the window's schedule consumed so far (a refused one included).
  int64_t position() const { return position_; }
  const std::vector<bool>& active() const { return active_; }
  // Per model, the 1-based applied-step count within the window of the step whose loss was not finite (it
  // froze the model), or -1.
  const std::vector<int64_t>& nonfinite_steps() const { return nonfinite_; }
  // With raise_on_nonfinite: the model whose loss stopped the window, or -1, and its step as above.
  int64_t raised_model() const { return raised_model_; }
  int64_t raised_step() const { return raised_step_; }

 private:
  OpGraph& graph_for(int64_t batch_size);
  void set_active_mask();
  // Updates the rows of `rows` after the finite check of `finite`; returns false when the window must stop.
  bool update_some(const at::Tensor& grad, const at::Tensor& finite, at::Tensor rows);

  // Bound again at every run's start (a check call of a graph unbinds its inputs).
  void bind_inputs();

  std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> step_graphs_;
  std::vector<at::Tensor> step_inputs_;
  std::vector<at::Tensor> all_inputs_;
  std::vector<at::Tensor> rows_inputs_;
  int64_t index_slot_;
  at::Tensor applied_;
  bool guard_;
  bool raise_;
  int64_t K_;
  std::shared_ptr<OpGraph> update_all_;
  std::shared_ptr<OpGraph> update_rows_;
  at::Tensor fresh_;
  at::Tensor needs_fresh_;
  std::shared_ptr<RowOptimizer> row_optimizer_;
  bool fast_ = true;  // update_all may stand for update_rows with every row on
  std::vector<at::Tensor> indices_;
  std::vector<at::Tensor> taking_;
  std::vector<bool> active_;
  int64_t num_active_ = 0;
  at::Tensor active_mask_;  // [K, 1] bool
  std::vector<int64_t> nonfinite_;
  int64_t raised_model_ = -1;
  int64_t raised_step_ = -1;
  int64_t position_ = 0;
  std::vector<at::Tensor> outputs_;
  std::vector<at::Tensor> no_outputs_;
};

}  // namespace hotloop
