// RAdam: torch.optim.RAdam's update (rectification, L2 or decoupled weight decay, maximize).
#include "optim/for_loop.h"

#include <cmath>

namespace hotloop {

void RAdam::check_group(const OptimizerGroup& group) const {
  for (const char* name : {"beta1", "beta2", "eps", "decoupled_weight_decay"}) option(group, name);
  check_scalar_state("RAdam", group, "step");
  check_param_state("RAdam", group, "exp_avg");
  check_param_state("RAdam", group, "exp_avg_sq");
}

void RAdam::set_momentum(OptimizerGroup& group, double momentum) const { group.options["beta1"] = momentum; }

// torch.optim's _single_tensor_radam (capturable=False), op for op; the scalar math is Python's, in double.
void RAdam::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  const double beta1 = option(group, "beta1");
  const double beta2 = option(group, "beta2");
  const double eps = option(group, "eps");
  const bool decoupled = option(group, "decoupled_weight_decay") != 0.0;
  const auto& steps = group.state.at("step");
  const auto& exp_avgs = group.state.at("exp_avg");
  const auto& exp_avg_sqs = group.state.at("exp_avg_sq");
  for (size_t i : plan.one_by_one) {
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    at::Tensor param = as_real(group.params[i]);
    grad = as_real(grad);
    at::Tensor exp_avg = as_real(exp_avgs[i]);
    at::Tensor exp_avg_sq = as_real(exp_avg_sqs[i]);

    increment_step(steps[i]);
    const double step = step_value(steps[i]);
    if (group.weight_decay != 0.0) {
      if (decoupled) {
        param.mul_(1.0 - lr * group.weight_decay);
      } else {
        grad = grad.add(param, group.weight_decay);
      }
    }
    exp_avg.lerp_(grad, 1.0 - beta1);
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);

    const double bias_correction1 = 1.0 - std::pow(beta1, step);
    const double bias_correction2 = 1.0 - std::pow(beta2, step);
    at::Tensor bias_corrected_exp_avg = exp_avg / bias_correction1;
    const double rho_inf = 2 / (1 - beta2) - 1;
    const double rho_t = rho_inf - 2 * step * std::pow(beta2, step) / bias_correction2;
    if (rho_t > 5.0) {
      const double rect =
          std::pow((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0.5);
      // Python's `float / tensor` is `tensor.reciprocal() * float`
      at::Tensor adaptive_lr = exp_avg_sq.sqrt().add_(eps).reciprocal() * std::pow(bias_correction2, 0.5);
      param.add_(bias_corrected_exp_avg * lr * adaptive_lr * rect, -1.0);
    } else {
      param.add_(bias_corrected_exp_avg * lr, -1.0);
    }
  }
}

}  // namespace hotloop
