// NativeStep: one training step as a captured joint graph run through the dispatcher plus a native optimizer.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "engine/op_graph.h"
#include "engine/step.h"
#include "engine/window_account.h"
#include "optim/optimizer.h"

namespace hotloop {

class NativeStep final : public DeviceStep {
 public:
  // params: the trainable parameters, in the order the graphs take them and return their gradients.
  // state: frozen parameters and buffers, the graphs' next inputs (updated in place by the graphs).
  // graphs: one per batch size, each taking (params..., state..., batch...) and returning
  // (grads..., loss, train metrics...). sample_shapes: the per-tensor sample shape the graphs were
  // captured for.
  // accumulate[i]: params[i] is not stepped by the optimizer, so, as in a plain loop whose zero_grad()
  // never reaches it, its .grad sums over steps instead of holding the last batch's gradient.
  // account_on_device: keep the window's sums and the non-finite guard as device tensors, skipping a
  // refused update through the optimizer's found_inf instead of reading each loss (default: when the
  // parameters are not on the CPU).
  NativeStep(std::vector<at::Tensor> params, std::vector<at::Tensor> state,
             std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> graphs,
             std::vector<std::vector<int64_t>> sample_shapes, std::vector<bool> accumulate,
             std::shared_ptr<NativeOptimizer> optimizer, std::optional<bool> account_on_device = std::nullopt);

  void begin_window(bool guard_nonfinite) override;
  StepOutcome run(Dataset& data) override;
  WindowTotals end_window() override;
  // One step on a batch gathered by another step (the aot step runs here the batch sizes it has no package for).
  StepOutcome run_batch(const std::vector<at::Tensor>& batch);

  // Points the graphs at new parameter and state tensors of the same shapes (the model replaced some).
  void bind(std::vector<at::Tensor> params, std::vector<at::Tensor> state);
  // Replaces the graphs with ones captured again (the same inputs and outputs): Python state that forward
  // reads changed between windows.
  void set_graphs(std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> graphs);
  // Which parameters the optimizer does not step (their .grad accumulates); may change between windows.
  void set_accumulate(std::vector<bool> accumulate);
  // Windows run with at most `threads` intra-op threads (0: the caller's setting, the default); the
  // caller's setting is back when the window ends, also by an exception.
  void set_window_threads(int64_t threads);
  int64_t window_threads() const { return window_threads_; }

  // Optimizer steps applied over this step's life.
  int64_t steps() const { return steps_; }
  const std::shared_ptr<NativeOptimizer>& optimizer() const { return optimizer_; }

 private:
  OpGraph& graph_for(int64_t batch_size);
  void check_graphs(const std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>>& graphs) const;
  void check_batch(const std::vector<at::Tensor>& batch) const;
  // One step on `batch`; false when the guard refused it on the host.
  bool train(const std::vector<at::Tensor>& batch);
  // Hands params_[i] its gradient as a plain loop's backward would.
  void set_grad(size_t i, const at::Tensor& grad);

  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> state_;
  std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>> graphs_;
  std::vector<std::vector<int64_t>> sample_shapes_;
  std::vector<bool> accumulate_;
  std::shared_ptr<NativeOptimizer> optimizer_;
  WindowAccount account_;
  std::vector<at::Tensor> outputs_;
  std::vector<at::Tensor> grads_;
  std::vector<at::Tensor> metrics_;
  std::vector<bool> had_grad_;  // per param, at the window's start
  int64_t window_steps_ = 0;    // optimizer steps issued in the window (some may be skipped on the device)
  int64_t steps_ = 0;
  int64_t window_threads_ = 0;
  int saved_threads_ = 0;  // the caller's thread count while a window runs with fewer, else 0
};

}  // namespace hotloop
