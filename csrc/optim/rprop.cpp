// Rprop: torch.optim.Rprop's update (etas, step_sizes, maximize).
#include "optim/for_loop.h"

namespace hotloop {

void Rprop::check_group(const OptimizerGroup& group) const {
  for (const char* name : {"etaminus", "etaplus", "step_size_min", "step_size_max"}) option(group, name);
  check_scalar_state("Rprop", group, "step");
  check_param_state("Rprop", group, "prev");
  check_param_state("Rprop", group, "step_size");
}

// torch.optim's _single_tensor_rprop (capturable=False), op for op: `t[mask] = v` is t.masked_fill_(mask, v).
void Rprop::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double) {
  const double etaminus = option(group, "etaminus");
  const double etaplus = option(group, "etaplus");
  const double step_size_min = option(group, "step_size_min");
  const double step_size_max = option(group, "step_size_max");
  const auto& steps = group.state.at("step");
  const auto& prevs = group.state.at("prev");
  const auto& step_sizes = group.state.at("step_size");
  for (size_t i : plan.one_by_one) {
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    increment_step(steps[i]);
    grad = as_real(grad);
    at::Tensor prev = as_real(prevs[i]);
    at::Tensor param = as_real(group.params[i]);
    at::Tensor step_size = as_real(step_sizes[i]);

    at::Tensor sign = grad.mul(prev).sign();
    sign.masked_fill_(sign.gt(0), etaplus);
    sign.masked_fill_(sign.lt(0), etaminus);
    sign.masked_fill_(sign.eq(0), 1);
    step_size.mul_(sign).clamp_(step_size_min, step_size_max);
    grad = grad.clone(at::MemoryFormat::Preserve);
    grad.masked_fill_(sign.eq(etaminus), 0);
    param.addcmul_(grad.sign(), step_size, -1);
    prev.copy_(grad);
  }
}

}  // namespace hotloop
