// NativeOptimizer: validation, the per-window plan (which params share a fused kernel call) and step().
#include "optim/optimizer.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>

namespace hotloop {

void NativeOptimizer::configure(std::vector<OptimizerGroup> groups, int64_t num_grads) {
  TORCH_CHECK(num_grads >= 0, "num_grads must be >= 0, got ", num_grads);
  std::vector<GroupPlan> plans;
  plans.reserve(groups.size());
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const OptimizerGroup& group = groups[gi];
    TORCH_CHECK(group.grad_index.size() == group.params.size(), "param group ", gi, " has ",
                group.params.size(), " params but ", group.grad_index.size(), " gradient indices");
    for (size_t i = 0; i < group.params.size(); ++i) {
      TORCH_CHECK(group.params[i].defined(), "param group ", gi, ": parameter ", i, " is undefined");
      TORCH_CHECK(group.grad_index[i] >= 0 && group.grad_index[i] < num_grads, "param group ", gi,
                  ": gradient index ", group.grad_index[i], " out of range for ", num_grads, " gradients");
    }
    check_group(group);

    GroupPlan plan;
    for (size_t i = 0; i < group.params.size(); ++i) {
      if (!fused_ || !can_fuse(group, i)) {
        plan.one_by_one.push_back(i);
        continue;
      }
      const at::Tensor& p = group.params[i];
      Bucket* bucket = nullptr;
      for (Bucket& b : plan.buckets) {
        const at::Tensor& q = group.params[b.members.front()];
        if (q.device() == p.device() && q.scalar_type() == p.scalar_type()) bucket = &b;
      }
      if (bucket == nullptr) bucket = &plan.buckets.emplace_back();
      bucket->members.push_back(i);
    }
    for (Bucket& b : plan.buckets) {
      for (size_t i : b.members) b.params.push_back(group.params[i]);
      b.grads.resize(b.members.size());
      fill_bucket(group, b);
    }
    plans.push_back(std::move(plan));
  }
  groups_ = std::move(groups);
  plans_ = std::move(plans);
  num_grads_ = num_grads;
  steps_in_window_ = 0;
}

void NativeOptimizer::step(const std::vector<at::Tensor>& grads, const at::Tensor& found_inf) {
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == num_grads_, "the optimizer was configured for ",
              num_grads_, " gradients, got ", grads.size());
  // Everything is checked before anything is updated, so a failed step leaves the state untouched.
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    const OptimizerGroup& group = groups_[gi];
    for (size_t i = 0; i < group.params.size(); ++i) {
      const at::Tensor& p = group.params[i];
      const at::Tensor& g = grads[group.grad_index[i]];
      TORCH_CHECK(g.defined(), "no gradient for parameter ", i, " of param group ", gi);
      TORCH_CHECK(g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type() && g.device() == p.device(),
                  "the gradient of parameter ", i, " of param group ", gi, " is ", g.toString(), g.sizes(),
                  " on ", g.device(), ", the parameter is ", p.toString(), p.sizes(), " on ", p.device());
      TORCH_CHECK(g.layout() == at::kStrided, "sparse gradients are not supported (parameter ", i,
                  " of param group ", gi, ")");
    }
    for (const auto* schedule : {&group.lr_per_step, &group.momentum_per_step}) {
      TORCH_CHECK(schedule->empty() || steps_in_window_ < static_cast<int64_t>(schedule->size()), "param group ",
                  gi, " has a schedule for ", schedule->size(), " steps in this window; step ",
                  steps_in_window_ + 1, " is one more");
    }
  }
  TORCH_CHECK(!found_inf.defined() || (found_inf.numel() == 1 && found_inf.scalar_type() == at::kFloat),
              "found_inf must be a one-element float32 tensor, got ", found_inf.toString(), found_inf.sizes());
  at::NoGradGuard no_grad;
  // The one-by-one updates are plain ATen ops: under found_inf they run and are undone where it is set.
  std::vector<at::Tensor> touched, saved;
  if (found_inf.defined()) {
    TORCH_CHECK(skips_on_device(), "this native optimizer cannot skip a step on the device (found_inf); "
                "only SGD, Adam and AdamW can");
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      const OptimizerGroup& group = groups_[gi];
      for (const auto* list : {&group.params, &group.momentum_buffers, &group.exp_avgs, &group.exp_avg_sqs,
                               &group.max_exp_avg_sqs}) {
        for (size_t i : plans_[gi].one_by_one) {
          if (i >= list->size()) continue;
          touched.push_back((*list)[i]);
          saved.push_back((*list)[i].clone());
        }
      }
    }
  }
  found_inf_ = found_inf;
  // The updates are torch.optim's no_grad in-place ops: skipping the autograd kernels saves a dispatch hop
  // per op (version counters are still bumped, below autograd).
  at::AutoDispatchBelowAutograd below_autograd;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    OptimizerGroup& group = groups_[gi];
    const double lr = group.lr_per_step.empty() ? group.lr : group.lr_per_step[steps_in_window_];
    if (!group.momentum_per_step.empty()) set_momentum(group, group.momentum_per_step[steps_in_window_]);
    step_group(group, plans_[gi], grads, lr);
  }
  found_inf_ = at::Tensor();
  if (!touched.empty()) {
    const at::Tensor skip = found_inf.reshape({}).ne(0);
    for (size_t k = 0; k < touched.size(); ++k) touched[k].copy_(at::where(skip, saved[k], touched[k]));
  }
  ++steps_in_window_;
}

void NativeOptimizer::record_step() {
  for (OptimizerGroup& group : groups_) {
    increment_steps(group.steps);
    if (group.momentum != 0.0) std::fill(group.buffer_is_new.begin(), group.buffer_is_new.end(), false);
  }
  ++steps_in_window_;
}

void NativeOptimizer::settle_window(int64_t skipped) {
  TORCH_CHECK(skipped >= 0 && skipped <= steps_in_window_, "settle_window: ", skipped,
              " skipped steps, but the window took ", steps_in_window_);
  if (skipped == 0) return;
  steps_in_window_ -= skipped;
  at::NoGradGuard no_grad;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    for (const Bucket& b : plans_[gi].buckets)
      for (const at::Tensor& s : b.copied_steps) s.sub_(skipped);
    const OptimizerGroup& group = groups_[gi];
    if (group.steps.empty()) continue;
    for (size_t i : plans_[gi].one_by_one) group.steps[i].sub_(skipped);
  }
}

void NativeOptimizer::increment_steps(const std::vector<at::Tensor>& steps) {
  std::vector<at::Tensor> others;
  for (const at::Tensor& s : steps) {
    if (s.is_cpu() && s.scalar_type() == at::kFloat) {
      *s.data_ptr<float>() += 1.0f;
    } else if (s.is_cpu() && s.scalar_type() == at::kDouble) {
      *s.data_ptr<double>() += 1.0;
    } else {
      others.push_back(s);
    }
  }
  if (!others.empty()) at::_foreach_add_(others, 1);
}

void NativeOptimizer::increment_step(const at::Tensor& step) {
  if (step.is_cpu() && step.scalar_type() == at::kFloat) {
    *step.data_ptr<float>() += 1.0f;
  } else if (step.is_cpu() && step.scalar_type() == at::kDouble) {
    *step.data_ptr<double>() += 1.0;
  } else {
    step.add_(1);
  }
}

double NativeOptimizer::step_value(const at::Tensor& step) {
  if (step.is_cpu() && step.scalar_type() == at::kFloat) return *step.const_data_ptr<float>();
  if (step.is_cpu() && step.scalar_type() == at::kDouble) return *step.const_data_ptr<double>();
  return step.item<double>();
}

void NativeOptimizer::scale_scalar(const at::Tensor& t, double factor) {
  // float * float rounded to float, as the CPU mul kernel computes a float tensor times a Python scalar
  if (t.is_cpu() && t.scalar_type() == at::kFloat) {
    float* value = t.data_ptr<float>();
    *value = *value * static_cast<float>(factor);
  } else if (t.is_cpu() && t.scalar_type() == at::kDouble) {
    *t.data_ptr<double>() *= factor;
  } else {
    t.mul_(factor);
  }
}

void NativeOptimizer::store_scalar(const at::Tensor& t, double value) {
  if (t.is_cpu() && t.scalar_type() == at::kFloat) {
    *t.data_ptr<float>() = static_cast<float>(value);
  } else if (t.is_cpu() && t.scalar_type() == at::kDouble) {
    *t.data_ptr<double>() = value;
  } else {
    t.fill_(value);
  }
}

double NativeOptimizer::option(const OptimizerGroup& group, const char* name) {
  auto it = group.options.find(name);
  TORCH_CHECK(it != group.options.end(), "the param group has no option '", name, "'");
  return it->second;
}

const std::vector<at::Tensor>& NativeOptimizer::per_param_state(const char* optimizer, const OptimizerGroup& group,
                                                                const char* key) {
  auto it = group.state.find(key);
  TORCH_CHECK(it != group.state.end(), optimizer, " needs the state '", key, "' of every parameter");
  const std::vector<at::Tensor>& state = it->second;
  TORCH_CHECK(state.size() == group.params.size(), optimizer, " needs one '", key, "' per parameter, got ",
              state.size(), " for ", group.params.size(), " parameters");
  return state;
}

void NativeOptimizer::check_param_state(const char* optimizer, const OptimizerGroup& group, const char* key) {
  const std::vector<at::Tensor>& state = per_param_state(optimizer, group, key);
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& p = group.params[i];
    const at::Tensor& s = state[i];
    TORCH_CHECK(s.defined() && s.sizes() == p.sizes() && s.device() == p.device() &&
                    s.scalar_type() == p.scalar_type(),
                "the '", key, "' of parameter ", i, " does not match it (", p.toString(), p.sizes(), " on ",
                p.device(), ")");
  }
}

void NativeOptimizer::check_scalar_state(const char* optimizer, const OptimizerGroup& group, const char* key) {
  const std::vector<at::Tensor>& state = per_param_state(optimizer, group, key);
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& s = state[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && at::isFloatingType(s.scalar_type()), "the '", key,
                "' of parameter ", i, " must be a one-element floating point tensor");
  }
}

void NativeOptimizer::add_kernel_step(Bucket& bucket, const at::Tensor& step, const at::Tensor& param) {
  if (step.device() == param.device() && step.dim() == 0) {
    bucket.kernel_steps.push_back(step);
  } else {
    bucket.copied_steps.push_back(step);
    // torch keeps a non-fused optimizer's steps on the CPU even for CUDA params; the kernel reads
    // its own device-side copies, advanced in step with them.
    bucket.kernel_steps.push_back(step.reshape({}).to(param.device(), at::kFloat, false, /*copy=*/true));
  }
}

at::Tensor NativeOptimizer::dense_like(const at::Tensor& grad) {
  return grad.is_contiguous() ? grad : grad.contiguous();
}

}  // namespace hotloop
