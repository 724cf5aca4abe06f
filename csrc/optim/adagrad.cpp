// Adagrad: torch.optim.Adagrad's update (lr_decay, weight decay, maximize), fused or for-loop.
#include "optim/for_loop.h"

namespace hotloop {

void Adagrad::check_group(const OptimizerGroup& group) const {
  for (const char* name : {"lr_decay", "eps"}) option(group, name);
  check_scalar_state("Adagrad", group, "step");
  check_param_state("Adagrad", group, "sum");
}

void Adagrad::set_momentum(OptimizerGroup&, double) const {
  TORCH_CHECK(false, "Adagrad has no momentum that a scheduler could cycle");
}

bool Adagrad::can_fuse(const OptimizerGroup& group, size_t i) const {
  // ATen's fused Adagrad kernel is CPU-only.
  const at::Tensor& p = group.params[i];
  const at::Tensor& sum = group.state.at("sum")[i];
  return p.is_cpu() && at::isFloatingType(p.scalar_type()) && p.is_contiguous() && sum.is_contiguous();
}

void Adagrad::fill_bucket(const OptimizerGroup& group, Bucket& bucket) const {
  for (size_t i : bucket.members) {
    bucket.sums.push_back(group.state.at("sum")[i]);
    add_kernel_step(bucket, group.state.at("step")[i], group.params[i]);
  }
}

void Adagrad::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  const double lr_decay = option(group, "lr_decay");
  const double eps = option(group, "eps");
  for (Bucket& b : plan.buckets) {
    for (size_t j = 0; j < b.members.size(); ++j) b.grads[j] = dense_like(grads[group.grad_index[b.members[j]]]);
    if (!b.copied_steps.empty()) increment_steps(b.copied_steps);
    increment_steps(b.kernel_steps);
    at::_fused_adagrad_(b.params, b.grads, b.sums, b.kernel_steps, lr, lr_decay, group.weight_decay, eps,
                        group.maximize);
    for (at::Tensor& g : b.grads) g = at::Tensor();
  }

  // torch.optim's _single_tensor_adagrad (dense gradients), op for op.
  const auto& steps = group.state.at("step");
  const auto& sums = group.state.at("sum");
  for (size_t i : plan.one_by_one) {
    increment_step(steps[i]);
    const double step = step_value(steps[i]);
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    at::Tensor param = group.params[i];
    if (group.weight_decay != 0.0) grad = grad.add(param, group.weight_decay);
    const double clr = lr / (1 + (step - 1) * lr_decay);
    grad = as_real(grad);
    at::Tensor state_sum = as_real(sums[i]);
    param = as_real(param);
    state_sum.addcmul_(grad, grad, 1);
    at::Tensor denom = state_sum.sqrt().add_(eps);
    param.addcdiv_(grad, denom, -clr);
  }
}

}  // namespace hotloop
