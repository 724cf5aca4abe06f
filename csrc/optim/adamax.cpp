// Adamax: torch.optim.Adamax's update (weight decay, maximize).
#include "optim/for_loop.h"

#include <cmath>

namespace hotloop {

void Adamax::check_group(const OptimizerGroup& group) const {
  for (const char* name : {"beta1", "beta2", "eps"}) option(group, name);
  check_scalar_state("Adamax", group, "step");
  check_param_state("Adamax", group, "exp_avg");
  check_param_state("Adamax", group, "exp_inf");
}

void Adamax::set_momentum(OptimizerGroup& group, double momentum) const { group.options["beta1"] = momentum; }

// torch.optim's _single_tensor_adamax (capturable=False), op for op.
void Adamax::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  const double beta1 = option(group, "beta1");
  const double beta2 = option(group, "beta2");
  const double eps = option(group, "eps");
  const auto& steps = group.state.at("step");
  const auto& exp_avgs = group.state.at("exp_avg");
  const auto& exp_infs = group.state.at("exp_inf");
  for (size_t i : plan.one_by_one) {
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    increment_step(steps[i]);
    at::Tensor param = group.params[i];
    if (group.weight_decay != 0.0) grad = grad.add(param, group.weight_decay);
    param = as_real(param);
    grad = as_real(grad);
    at::Tensor exp_avg = as_real(exp_avgs[i]);
    at::Tensor exp_inf = as_real(exp_infs[i]);
    exp_avg.lerp_(grad, 1.0 - beta1);
    at::maximum_out(exp_inf, exp_inf.mul_(beta2), grad.abs().add_(eps));
    const double bias_correction = 1.0 - std::pow(beta1, step_value(steps[i]));
    const double clr = lr / bias_correction;
    param.addcdiv_(exp_avg, exp_inf, -clr);
  }
}

}  // namespace hotloop
