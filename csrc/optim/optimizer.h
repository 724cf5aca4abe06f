// Native torch.optim optimizers (SGD, Adam, AdamW here; the others in optim/for_loop.h): one optimizer step on gradients handed over from C++, updating the very
// tensors that live in a torch.optim optimizer's param_groups and state.
//
// Use from Python (python/hotloop/optim.py does all of this):
//   handle, reason = native_optimizer(opt)            # builds _C.SGD / _C.Adam, or says why it cannot
//   schedule, settle = schedule_window(sched, n)      # only with a per-step LR scheduler
//   configure_window(handle, opt, grad_params, **schedule)   # at every window boundary
//   ... C++ calls handle->step(grads) once per batch ...
//   finish_window(handle, opt); settle(handle.steps_in_window)   # state and scheduler are torch's again
// Use from C++ (a Step implementation, GIL released):
//   optimizer->step(grads);   // grads[j] is the gradient of grad_params[j] given to configure_window
// step() runs no Python and takes no GIL. configure() must not run while step() may be running.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace hotloop {

// One torch.optim param group as seen by an optimizer step: the group's trainable params, their state
// tensors (the very objects in optimizer.state, updated in place) and the hyperparameters read at the
// window boundary. Unused state lists stay empty.
struct OptimizerGroup {
  std::vector<at::Tensor> params;
  std::vector<int64_t> grad_index;  // params[i]'s gradient is grads[grad_index[i]] in step()
  double lr = 0.0;
  // Per-step schedules (a scheduler run ahead through the window): when not empty, step k of the window
  // uses lr_per_step[k] as lr, and momentum_per_step[k] as SGD's momentum or Adam's beta1.
  std::vector<double> lr_per_step;
  std::vector<double> momentum_per_step;
  double weight_decay = 0.0;
  bool maximize = false;

  // SGD
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
  std::vector<at::Tensor> momentum_buffers;  // aligned with params when momentum != 0
  std::vector<bool> buffer_is_new;  // torch's "no buffer yet": the next step sets the buffer to the gradient

  // Adam / AdamW
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  bool amsgrad = false;
  bool decoupled_weight_decay = false;  // AdamW
  std::vector<at::Tensor> exp_avgs;
  std::vector<at::Tensor> exp_avg_sqs;
  std::vector<at::Tensor> max_exp_avg_sqs;  // amsgrad only
  std::vector<at::Tensor> steps;            // 0-dim, incremented by one per step like torch.optim's

  // The optimizers of optim/for_loop.h: state tensors under torch.optim's own state keys ("step",
  // "square_avg", "mu_product", ...), each list aligned with params, and the group's other
  // hyperparameters by name (each optimizer's header comment lists the names it reads).
  std::map<std::string, std::vector<at::Tensor>> state;
  std::map<std::string, double> options;
};

class NativeOptimizer {
 public:
  // fused: use ATen's fused kernel (at::_fused_sgd_, at::_fused_adam(w)_) wherever it applies; the
  // other params, or all when not fused, go through ATen ops that replicate torch.optim's for-loop
  // implementation op for op (bitwise equal to it on CPU).
  explicit NativeOptimizer(bool fused) : fused_(fused) {}
  virtual ~NativeOptimizer() = default;
  bool fused() const { return fused_; }

  // Replaces the groups for the next window; num_grads is the length of the grads vector step() gets.
  // Validates everything step() relies on, so step() itself only fails on bad gradients.
  void configure(std::vector<OptimizerGroup> groups, int64_t num_grads);

  // One optimizer step. grads may hold undefined tensors for slots no group uses. found_inf (0-dim
  // float32 on the params' device, optional): where it is set the update is skipped on the device, as
  // torch.optim's fused steps skip it for GradScaler; settle_window() then corrects the host's counts.
  void step(const std::vector<at::Tensor>& grads, const at::Tensor& found_inf = {});
  // The last `skipped` steps of the window were skipped through found_inf: takes them off the window's
  // step count and off the step counters kept on the host.
  void settle_window(int64_t skipped);

  // A step whose update ran elsewhere on these groups' state (the aot engine's compiled step): counts it as
  // step() would, advancing the step tensors, SGD's first-step flags and the window's step count.
  void record_step();

  // Whether step() can take a found_inf (SGD, Adam and AdamW; the other optimizers' states are not undone).
  virtual bool skips_on_device() const { return false; }

  // Steps taken since the last configure().
  int64_t steps_in_window() const { return steps_in_window_; }
  // The groups as configured, with buffer_is_new kept current.
  const std::vector<OptimizerGroup>& groups() const { return groups_; }

 protected:
  // Params of one group that one fused kernel call updates: same device and dtype, all contiguous.
  struct Bucket {
    std::vector<size_t> members;  // indices into the group's params
    std::vector<at::Tensor> params, momentum_buffers, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, sums;
    std::vector<at::Tensor> kernel_steps;  // the state's steps, or float32 copies on the params' device
    std::vector<at::Tensor> copied_steps;  // the state's steps that kernel_steps holds copies of
    std::vector<at::Tensor> grads;  // refilled every step
  };
  struct GroupPlan {
    std::vector<Bucket> buckets;    // fused kernel calls
    std::vector<size_t> one_by_one;  // params stepped with the for-loop replica
  };

  // torch.optim's `step += 1` on 0-dim step tensors (a plain store for CPU ones, the common case).
  static void increment_steps(const std::vector<at::Tensor>& steps);
  static void increment_step(const at::Tensor& step);
  static double step_value(const at::Tensor& step);
  // torch.optim's `t *= factor` and `t.copy_(torch.as_tensor(value))` on a one-element state tensor, in
  // its dtype (plain loads and stores for CPU float and double tensors).
  static void scale_scalar(const at::Tensor& t, double factor);
  static void store_scalar(const at::Tensor& t, double value);
  // The gradient laid out like its param, as fused kernels assume.
  static at::Tensor dense_like(const at::Tensor& grad);
  // torch.view_as_real for complex tensors, as torch.optim steps complex params; others unchanged.
  static at::Tensor as_real(const at::Tensor& t) { return t.is_complex() ? at::view_as_real(t) : t; }

  // What check_group implementations share: a named option, and a state list by torch.optim's key
  // whose tensors are shaped like the params or hold one element.
  static double option(const OptimizerGroup& group, const char* name);
  // The group's state list `key`, one tensor per parameter (checked).
  static const std::vector<at::Tensor>& per_param_state(const char* optimizer, const OptimizerGroup& group,
                                                        const char* key);
  static void check_param_state(const char* optimizer, const OptimizerGroup& group, const char* key);
  static void check_scalar_state(const char* optimizer, const OptimizerGroup& group, const char* key);
  // The step tensors a fused kernel reads: the state's own, or device copies advanced along with them.
  static void add_kernel_step(Bucket& bucket, const at::Tensor& step, const at::Tensor& param);

  virtual void check_group(const OptimizerGroup& group) const = 0;
  virtual void set_momentum(OptimizerGroup& group, double momentum) const = 0;
  virtual bool can_fuse(const OptimizerGroup& group, size_t i) const = 0;
  virtual void fill_bucket(const OptimizerGroup& group, Bucket& bucket) const = 0;
  virtual void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                          double lr) = 0;

  std::optional<at::Tensor> optional_found_inf() const {
    return found_inf_.defined() ? std::optional<at::Tensor>(found_inf_.reshape({})) : std::nullopt;
  }

  bool fused_;
  std::vector<OptimizerGroup> groups_;
  std::vector<GroupPlan> plans_;
  int64_t num_grads_ = 0;
  int64_t steps_in_window_ = 0;
  at::Tensor found_inf_;  // the current step's, for the fused kernels (undefined: apply the update)
};

// torch.optim.SGD.
class SGD final : public NativeOptimizer {
 public:
  explicit SGD(bool fused = true) : NativeOptimizer(fused) {}
  bool skips_on_device() const override { return true; }

 protected:
  void check_group(const OptimizerGroup& group) const override;
  void set_momentum(OptimizerGroup& group, double momentum) const override;
  bool can_fuse(const OptimizerGroup& group, size_t i) const override;
  void fill_bucket(const OptimizerGroup& group, Bucket& bucket) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

// torch.optim.Adam, and AdamW (groups with decoupled_weight_decay).
class Adam final : public NativeOptimizer {
 public:
  explicit Adam(bool fused = true) : NativeOptimizer(fused) {}
  bool skips_on_device() const override { return true; }

 protected:
  void check_group(const OptimizerGroup& group) const override;
  void set_momentum(OptimizerGroup& group, double momentum) const override;
  bool can_fuse(const OptimizerGroup& group, size_t i) const override;
  void fill_bucket(const OptimizerGroup& group, Bucket& bucket) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

}  // namespace hotloop
