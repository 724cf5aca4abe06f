// Adadelta: torch.optim.Adadelta's update (rho, weight decay, maximize).
#include "optim/for_loop.h"

namespace hotloop {

void Adadelta::check_group(const OptimizerGroup& group) const {
  for (const char* name : {"rho", "eps"}) option(group, name);
  check_scalar_state("Adadelta", group, "step");
  check_param_state("Adadelta", group, "square_avg");
  check_param_state("Adadelta", group, "acc_delta");
}

// torch.optim's _single_tensor_adadelta (capturable=False), op for op.
void Adadelta::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  const double rho = option(group, "rho");
  const double eps = option(group, "eps");
  const auto& steps = group.state.at("step");
  const auto& square_avgs = group.state.at("square_avg");
  const auto& acc_deltas = group.state.at("acc_delta");
  for (size_t i : plan.one_by_one) {
    increment_step(steps[i]);
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    const at::Tensor& param = group.params[i];
    if (group.weight_decay != 0.0) grad = grad.add(param, group.weight_decay);
    at::Tensor square_avg = as_real(square_avgs[i]);
    at::Tensor acc_delta = as_real(acc_deltas[i]);
    grad = as_real(grad);

    square_avg.mul_(rho).addcmul_(grad, grad, 1.0 - rho);
    at::Tensor denom = square_avg.add(eps).sqrt_();
    at::Tensor delta = acc_delta.add(eps).sqrt_();
    delta.div_(denom).mul_(grad);
    acc_delta.mul_(rho).addcmul_(delta, delta, 1.0 - rho);
    if (param.is_complex()) delta = at::view_as_complex(delta);
    param.add_(delta, -lr);
  }
}

}  // namespace hotloop
