// RMSprop: torch.optim.RMSprop's update (centered, momentum, weight decay, maximize).
#include "optim/for_loop.h"

namespace hotloop {

void RMSprop::check_group(const OptimizerGroup& group) const {
  for (const char* name : {"alpha", "eps", "momentum", "centered"}) option(group, name);
  check_scalar_state("RMSprop", group, "step");
  check_param_state("RMSprop", group, "square_avg");
  bool uses_buffer = option(group, "momentum") > 0.0;
  for (double m : group.momentum_per_step) uses_buffer = uses_buffer || m > 0.0;
  if (uses_buffer) check_param_state("RMSprop", group, "momentum_buffer");
  if (option(group, "centered") != 0.0) check_param_state("RMSprop", group, "grad_avg");
}

void RMSprop::set_momentum(OptimizerGroup& group, double momentum) const { group.options["momentum"] = momentum; }

// torch.optim's _single_tensor_rmsprop, op for op.
void RMSprop::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  const double alpha = option(group, "alpha");
  const double eps = option(group, "eps");
  const double momentum = option(group, "momentum");
  const bool centered = option(group, "centered") != 0.0;
  const auto& steps = group.state.at("step");
  const auto& square_avgs = group.state.at("square_avg");
  for (size_t i : plan.one_by_one) {
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    increment_step(steps[i]);
    at::Tensor param = group.params[i];
    if (group.weight_decay != 0.0) grad = grad.add(param, group.weight_decay);
    param = as_real(param);
    grad = as_real(grad);
    at::Tensor square_avg = as_real(square_avgs[i]);
    square_avg.mul_(alpha).addcmul_(grad, grad, 1.0 - alpha);
    at::Tensor avg;
    if (centered) {
      at::Tensor grad_avg = as_real(group.state.at("grad_avg")[i]);
      grad_avg.lerp_(grad, 1.0 - alpha);
      avg = square_avg.addcmul(grad_avg, grad_avg, -1).sqrt_();
    } else {
      avg = square_avg.sqrt();
    }
    avg.add_(eps);
    if (momentum > 0.0) {
      at::Tensor buf = as_real(group.state.at("momentum_buffer")[i]);
      buf.mul_(momentum).addcdiv_(grad, avg);
      param.add_(buf, -lr);
    } else {
      param.addcdiv_(grad, avg, -lr);
    }
  }
}

}  // namespace hotloop
