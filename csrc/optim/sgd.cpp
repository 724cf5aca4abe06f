// SGD: torch.optim.SGD's update (momentum, dampening, nesterov, weight decay, maximize).
#include "optim/optimizer.h"

namespace hotloop {

namespace {

bool fusable_tensor(const at::Tensor& t, const at::Tensor& param) {
  return t.device() == param.device() && t.scalar_type() == param.scalar_type() && t.is_contiguous();
}

}  // namespace

void SGD::check_group(const OptimizerGroup& group) const {
  TORCH_CHECK(group.momentum >= 0.0, "SGD momentum must be >= 0, got ", group.momentum);
  TORCH_CHECK(!group.nesterov || (group.momentum > 0.0 && group.dampening == 0.0),
              "SGD's nesterov momentum requires a momentum and zero dampening");
  for (double m : group.momentum_per_step) {
    // A zero momentum would change what torch.optim keeps in the state: not something to switch mid-window.
    TORCH_CHECK(group.momentum != 0.0 && m > 0.0, "SGD's per-step momentum must stay above zero, got ", m,
                " (momentum ", group.momentum, ")");
  }
  if (group.momentum == 0.0) {
    TORCH_CHECK(group.momentum_buffers.empty(), "SGD without momentum takes no momentum buffers");
    return;
  }
  TORCH_CHECK(group.momentum_buffers.size() == group.params.size() &&
                  group.buffer_is_new.size() == group.params.size(),
              "SGD with momentum needs one momentum buffer and one buffer_is_new flag per parameter, got ",
              group.momentum_buffers.size(), " and ", group.buffer_is_new.size(), " for ", group.params.size(),
              " parameters");
  for (size_t i = 0; i < group.params.size(); ++i) {
    const at::Tensor& p = group.params[i];
    const at::Tensor& buf = group.momentum_buffers[i];
    TORCH_CHECK(buf.defined() && buf.sizes() == p.sizes() && buf.device() == p.device() &&
                    buf.scalar_type() == p.scalar_type(),
                "the momentum buffer of parameter ", i, " does not match it (", p.toString(), p.sizes(), " on ",
                p.device(), ")");
  }
}

void SGD::set_momentum(OptimizerGroup& group, double momentum) const { group.momentum = momentum; }

bool SGD::can_fuse(const OptimizerGroup& group, size_t i) const {
  const at::Tensor& p = group.params[i];
  if (!(p.is_cpu() || p.is_cuda()) || !at::isFloatingType(p.scalar_type()) || !p.is_contiguous()) return false;
  return group.momentum == 0.0 || fusable_tensor(group.momentum_buffers[i], p);
}

void SGD::fill_bucket(const OptimizerGroup& group, Bucket& bucket) const {
  if (group.momentum == 0.0) return;
  for (size_t i : bucket.members) bucket.momentum_buffers.push_back(group.momentum_buffers[i]);
}

void SGD::step_group(OptimizerGroup& group, GroupPlan& plan, const std::vector<at::Tensor>& grads, double lr) {
  const bool with_momentum = group.momentum != 0.0;
  for (Bucket& b : plan.buckets) {
    bool any_new = false, any_old = false;
    for (size_t j = 0; j < b.members.size(); ++j) {
      b.grads[j] = dense_like(grads[group.grad_index[b.members[j]]]);
      if (with_momentum) (group.buffer_is_new[b.members[j]] ? any_new : any_old) = true;
    }
    if (!(any_new && any_old)) {
      at::_fused_sgd_(b.params, b.grads, with_momentum ? at::TensorList(b.momentum_buffers) : at::TensorList(),
                      group.weight_decay, group.momentum, lr, group.dampening, group.nesterov, group.maximize,
                      /*is_first_step=*/any_new, /*grad_scale=*/std::nullopt, optional_found_inf());
    } else {
      // The kernel's first-step flag covers a whole call: split the bucket once, on the step that needs it.
      for (bool first : {true, false}) {
        std::vector<at::Tensor> params, bufs, gs;
        for (size_t j = 0; j < b.members.size(); ++j) {
          if (group.buffer_is_new[b.members[j]] != first) continue;
          params.push_back(b.params[j]);
          bufs.push_back(b.momentum_buffers[j]);
          gs.push_back(b.grads[j]);
        }
        at::_fused_sgd_(params, gs, bufs, group.weight_decay, group.momentum, lr, group.dampening, group.nesterov,
                        group.maximize, first, /*grad_scale=*/std::nullopt, optional_found_inf());
      }
    }
    if (any_new) {
      for (size_t i : b.members) group.buffer_is_new[i] = false;
    }
    for (at::Tensor& g : b.grads) g = at::Tensor();
  }

  // torch.optim's _single_tensor_sgd, op for op.
  for (size_t i : plan.one_by_one) {
    at::Tensor& param = group.params[i];
    at::Tensor grad = grads[group.grad_index[i]];
    if (group.maximize) grad = at::neg(grad);
    if (group.weight_decay != 0.0) grad = grad.add(param, group.weight_decay);
    if (with_momentum) {
      at::Tensor& buf = group.momentum_buffers[i];
      if (group.buffer_is_new[i]) {
        buf.copy_(grad);
        group.buffer_is_new[i] = false;
      } else {
        buf.mul_(group.momentum).add_(grad, 1.0 - group.dampening);
      }
      grad = group.nesterov ? grad.add(buf, group.momentum) : buf;
    }
    param.add_(grad, -lr);
  }
}

}  // namespace hotloop
