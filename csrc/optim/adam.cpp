// Adam and AdamW: torch.optim.Adam's update (amsgrad, L2 or decoupled weight decay, maximize).
#include "optim/optimizer.h"

#include <cmath>

namespace hotloop {

namespace {

bool fusable_tensor(const at::Tensor& t, const at::Tensor& param) {
  return t.device() == param.device() && t.scalar_type() == param.scalar_type() && t.is_contiguous();
}

void check_state(const char* name, const std::vector<at::Tensor>& state, const std::vector<at::Tensor>& params) {
  TORCH_CHECK(state.size() == params.size(), "Adam needs one ", name, " per parameter, got ", state.size(), " for ",
              params.size(), " parameters");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& s = state[i];
    TORCH_CHECK(s.defined() && s.sizes() == p.sizes() && s.device() == p.device() &&
                    s.scalar_type() == p.scalar_type(),
                "the ", name, " of parameter ", i, " does not match it (", p.toString(), p.sizes(), " on ",
                p.device(), ")");
  }
}

}  // namespace

void Adam::check_group(const OptimizerGroup& group) const {
  check_state("exp_avg", group.exp_avgs, group.params);
  check_state("exp_avg_sq", group.exp_avg_sqs, group.params);
  if (group.amsgrad) {
    check_state("max_exp_avg_sq", group.max_exp_avg_sqs, group.params);
  } else {
    TORCH_CHECK(group.max_exp_avg_sqs.empty(), "Adam without amsgrad takes no max_exp_avg_sq");
  }
  for (double beta1 : group.momentum_per_step) {
    TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "Adam's per-step beta1 must be in [0, 1), got ", beta1);
  }
  TORCH_CHECK(group.steps.size() == group.params.size(), "Adam needs one step tensor per parameter, got ",
              group.steps.size(), " for ", group.params.size(), " parameters");
  for (size_t i = 0; i < group.steps.size(); ++i) {
    const at::Tensor& s = group.steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && at::isFloatingType(s.scalar_type()),
                "the step of parameter ", i, " must be a one-element floating point tensor");
  }
}

void Adam::set_momentum(OptimizerGroup& group, double momentum) const { group.beta1 = momentum; }

bool Adam::can_fuse(const OptimizerGroup& group, size_t i) const {
  const at::Tensor& p = group.params[i];
  if (!(p.is_cpu() || p.is_cuda()) || !at::isFloatingType(p.scalar_type()) || !p.is_contiguous()) return false;
  if (!fusable_tensor(group.exp_avgs[i], p) || !fusable_tensor(group.exp_avg_sqs[i], p)) return false;
  return !group.amsgrad || fusable_tensor(group.max_exp_avg_sqs[i], p);
}

void Adam::fill_bucket(const OptimizerGroup& group, Bucket& bucket) const {
  for (size_t i : bucket.members) {
    bucket.exp_avgs.push_back(group.exp_avgs[i]);
    bucket.exp_avg_sqs.push_back(group.exp_avg_sqs[i]);
    if (group.amsgrad) bucket.max_exp_avg_sqs.push_back(group.max_exp_avg_sqs[i]);
    add_kernel_step(bucket, group.steps[i], group.params[i]);
  }
}

void Adam::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  for (Bucket& b : plan.buckets) {
    for (size_t j = 0; j < b.members.size(); ++j) b.grads[j] = dense_like(grads[group.grad_index[b.members[j]]]);
    if (!b.copied_steps.empty()) increment_steps(b.copied_steps);
    increment_steps(b.kernel_steps);
    if (group.decoupled_weight_decay) {
      at::_fused_adamw_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.kernel_steps, lr,
                        group.beta1, group.beta2, group.weight_decay, group.eps, group.amsgrad, group.maximize,
                        /*grad_scale=*/std::nullopt, optional_found_inf());
    } else {
      at::_fused_adam_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.kernel_steps, lr,
                       group.beta1, group.beta2, group.weight_decay, group.eps, group.amsgrad, group.maximize,
                       /*grad_scale=*/std::nullopt, optional_found_inf());
    }
    // as torch.optim's _fused_adam: a skipped update does not count as a step
    if (found_inf_.defined())
      at::_foreach_sub_(b.kernel_steps, std::vector<at::Tensor>(b.kernel_steps.size(), found_inf_.reshape({})));
    for (at::Tensor& g : b.grads) g = at::Tensor();
  }

  // torch.optim's _single_tensor_adam (capturable=False), op for op; the scalar math is Python's, in double.
  for (size_t i : plan.one_by_one) {
    at::Tensor param = group.params[i];
    at::Tensor grad = grads[group.grad_index[i]];
    at::Tensor exp_avg = group.exp_avgs[i];
    at::Tensor exp_avg_sq = group.exp_avg_sqs[i];
    at::Tensor max_exp_avg_sq = group.amsgrad ? group.max_exp_avg_sqs[i] : at::Tensor();
    if (group.maximize) grad = at::neg(grad);
    increment_steps({group.steps[i]});
    if (group.weight_decay != 0.0) {
      if (group.decoupled_weight_decay) {
        param.mul_(1.0 - lr * group.weight_decay);
      } else {
        grad = grad.add(param, group.weight_decay);
      }
    }
    if (param.is_complex()) {
      grad = at::view_as_real(grad);
      exp_avg = at::view_as_real(exp_avg);
      exp_avg_sq = at::view_as_real(exp_avg_sq);
      if (group.amsgrad) max_exp_avg_sq = at::view_as_real(max_exp_avg_sq);
      param = at::view_as_real(param);
    }
    exp_avg.lerp_(grad, 1.0 - group.beta1);
    exp_avg_sq.mul_(group.beta2).addcmul_(grad, grad, 1.0 - group.beta2);

    const double step = step_value(group.steps[i]);
    const double bias_correction1 = 1.0 - std::pow(group.beta1, step);
    const double bias_correction2 = 1.0 - std::pow(group.beta2, step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
    at::Tensor denom;
    if (group.amsgrad) {
      at::maximum_out(max_exp_avg_sq, max_exp_avg_sq, exp_avg_sq);
      denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group.eps);
    } else {
      denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group.eps);
    }
    param.addcdiv_(exp_avg, denom, -step_size);
  }
}

}  // namespace hotloop
