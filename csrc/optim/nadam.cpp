// NAdam: torch.optim.NAdam's update (momentum_decay, L2 or decoupled weight decay, maximize).
#include "optim/for_loop.h"

#include <cmath>

namespace hotloop {

void NAdam::check_group(const OptimizerGroup& group) const {
  for (const char* name : {"beta1", "beta2", "eps", "momentum_decay", "decoupled_weight_decay"}) option(group, name);
  check_scalar_state("NAdam", group, "step");
  check_scalar_state("NAdam", group, "mu_product");
  check_param_state("NAdam", group, "exp_avg");
  check_param_state("NAdam", group, "exp_avg_sq");
}

void NAdam::set_momentum(OptimizerGroup& group, double momentum) const { group.options["beta1"] = momentum; }

// torch.optim's _single_tensor_nadam (capturable=False), op for op; the scalar math is Python's, in double.
void NAdam::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  const double beta1 = option(group, "beta1");
  const double beta2 = option(group, "beta2");
  const double eps = option(group, "eps");
  const double momentum_decay = option(group, "momentum_decay");
  const bool decoupled = option(group, "decoupled_weight_decay") != 0.0;
  const auto& steps = group.state.at("step");
  const auto& mu_products = group.state.at("mu_product");
  const auto& exp_avgs = group.state.at("exp_avg");
  const auto& exp_avg_sqs = group.state.at("exp_avg_sq");
  for (size_t i : plan.one_by_one) {
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    at::Tensor param = as_real(group.params[i]);
    grad = as_real(grad);
    at::Tensor exp_avg = as_real(exp_avgs[i]);
    at::Tensor exp_avg_sq = as_real(exp_avg_sqs[i]);
    const at::Tensor& mu_product = mu_products[i];

    increment_step(steps[i]);
    const double step = step_value(steps[i]);
    const double bias_correction2 = 1.0 - std::pow(beta2, step);
    if (group.weight_decay != 0.0) {
      if (decoupled) {
        param.mul_(1.0 - lr * group.weight_decay);
      } else {
        grad = grad.add(param, group.weight_decay);
      }
    }
    const double mu = beta1 * (1.0 - 0.5 * std::pow(0.96, step * momentum_decay));
    const double mu_next = beta1 * (1.0 - 0.5 * std::pow(0.96, (step + 1) * momentum_decay));
    scale_scalar(mu_product, mu);

    exp_avg.lerp_(grad, 1.0 - beta1);
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);
    at::Tensor denom = exp_avg_sq.div(bias_correction2).sqrt();

    const double mu_product_value = step_value(mu_product);
    const double mu_product_next = mu_product_value * mu_next;
    denom.add_(eps);
    param.addcdiv_(grad, denom, -lr * (1.0 - mu) / (1.0 - mu_product_value));
    param.addcdiv_(exp_avg, denom, (-lr * mu_next) / (1.0 - mu_product_next));
  }
}

}  // namespace hotloop
