// The torch.optim optimizers beyond SGD and Adam: each replays torch.optim's _single_tensor_* function
// (capturable=False, differentiable=False) op for op with ATen ops, bitwise equal to it on CPU; Adagrad
// can also run ATen's fused kernel. State tensors come in OptimizerGroup::state under torch.optim's own
// keys, other hyperparameters in OptimizerGroup::options under the names each class lists.
#pragma once

#include "optim/optimizer.h"

namespace hotloop {

// A NativeOptimizer with no fused kernel: every param is stepped one by one.
class ForLoopOptimizer : public NativeOptimizer {
 public:
  ForLoopOptimizer() : NativeOptimizer(/*fused=*/false) {}

 protected:
  void set_momentum(OptimizerGroup& group, double momentum) const override;
  bool can_fuse(const OptimizerGroup&, size_t) const override { return false; }
  void fill_bucket(const OptimizerGroup&, Bucket&) const override {}
};

// torch.optim.RMSprop. Options: alpha, eps, momentum, centered (0/1). State: step, square_avg,
// momentum_buffer (momentum > 0), grad_avg (centered).
class RMSprop final : public ForLoopOptimizer {
 protected:
  void check_group(const OptimizerGroup& group) const override;
  void set_momentum(OptimizerGroup& group, double momentum) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

// torch.optim.Adagrad. Options: lr_decay, eps. State: step, sum. Fused: ATen's _fused_adagrad_ for
// CPU floating point params (bitwise equal to torch.optim.Adagrad(fused=True)).
class Adagrad final : public NativeOptimizer {
 public:
  explicit Adagrad(bool fused = true) : NativeOptimizer(fused) {}

 protected:
  void check_group(const OptimizerGroup& group) const override;
  void set_momentum(OptimizerGroup& group, double momentum) const override;
  bool can_fuse(const OptimizerGroup& group, size_t i) const override;
  void fill_bucket(const OptimizerGroup& group, Bucket& bucket) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

// torch.optim.Adamax. Options: beta1, beta2, eps. State: step, exp_avg, exp_inf.
class Adamax final : public ForLoopOptimizer {
 protected:
  void check_group(const OptimizerGroup& group) const override;
  void set_momentum(OptimizerGroup& group, double momentum) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

// torch.optim.NAdam. Options: beta1, beta2, eps, momentum_decay, decoupled_weight_decay (0/1).
// State: step, mu_product, exp_avg, exp_avg_sq.
class NAdam final : public ForLoopOptimizer {
 protected:
  void check_group(const OptimizerGroup& group) const override;
  void set_momentum(OptimizerGroup& group, double momentum) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

// torch.optim.RAdam. Options: beta1, beta2, eps, decoupled_weight_decay (0/1). State: step, exp_avg,
// exp_avg_sq.
class RAdam final : public ForLoopOptimizer {
 protected:
  void check_group(const OptimizerGroup& group) const override;
  void set_momentum(OptimizerGroup& group, double momentum) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

// torch.optim.ASGD. Options: lambd, alpha, t0, default_float64 (0/1: torch.get_default_dtype() is
// float64, the dtype torch.as_tensor gives the new eta and mu before they are copied into the state).
// State: step, eta, mu, ax.
class ASGD final : public ForLoopOptimizer {
 protected:
  void check_group(const OptimizerGroup& group) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

// torch.optim.Rprop (lr only seeds step_size when the state is created). Options: etaminus, etaplus,
// step_size_min, step_size_max. State: step, prev, step_size.
class Rprop final : public ForLoopOptimizer {
 protected:
  void check_group(const OptimizerGroup& group) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

// torch.optim.Adadelta. Options: rho, eps. State: step, square_avg, acc_delta.
class Adadelta final : public ForLoopOptimizer {
 protected:
  void check_group(const OptimizerGroup& group) const override;
  void step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads,
                  double lr) override;
};

}  // namespace hotloop
