// ASGD: torch.optim.ASGD's update (lambd, alpha, t0, weight decay, maximize).
#include "optim/for_loop.h"

#include <algorithm>
#include <cmath>

namespace hotloop {

void ASGD::check_group(const OptimizerGroup& group) const {
  for (const char* name : {"lambd", "alpha", "t0", "default_float64"}) option(group, name);
  for (const char* key : {"step", "eta", "mu"}) check_scalar_state("ASGD", group, key);
  check_param_state("ASGD", group, "ax");
}

// torch.optim's _single_tensor_asgd (capturable=False), op for op; the scalar math is Python's, in double.
void ASGD::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  const double lambd = option(group, "lambd");
  const double alpha = option(group, "alpha");
  const double t0 = option(group, "t0");
  const bool default_float64 = option(group, "default_float64") != 0.0;
  // torch.as_tensor(python_float): a tensor of the default dtype, then copied into the state's dtype
  auto as_tensor_value = [default_float64](double v) { return default_float64 ? v : double(float(v)); };
  const auto& steps = group.state.at("step");
  const auto& etas = group.state.at("eta");
  const auto& mus = group.state.at("mu");
  const auto& axs = group.state.at("ax");
  for (size_t i : plan.one_by_one) {
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    grad = as_real(grad);
    at::Tensor param = as_real(group.params[i]);
    at::Tensor ax = as_real(axs[i]);
    const at::Tensor& mu = mus[i];

    increment_step(steps[i]);
    if (group.weight_decay != 0.0) grad = grad.add(param, group.weight_decay);
    const double eta_value = step_value(etas[i]);
    param.mul_(1 - lambd * eta_value);
    param.add_(grad, -eta_value);
    if (step_value(mu) != 1) {
      ax.add_(param.sub(ax).mul_(mu));
    } else {
      ax.copy_(param);
    }
    const double step = step_value(steps[i]);
    store_scalar(etas[i], as_tensor_value(lr / std::pow(1 + lambd * lr * step, alpha)));
    store_scalar(mu, as_tensor_value(1 / std::max(1.0, step - t0)));
  }
}

}  // namespace hotloop
