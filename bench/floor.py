"""The raw-ops floor: a Linear-ReLU-Linear step written as bare ATen calls plus ``torch._fused_adam_``.

No autograd, no nn.Module, no torch.optim: what one step costs when Python only dispatches the ops. It is
what the native engine aims at (a prototype measured ~37 us/step for MLP 16-32-1 without the gather).
"""

from __future__ import annotations

import torch
from torch import nn

from .loops import Data, Runner, Skip, generator
from .workloads import Workload

_nll_forward = torch.ops.aten.nll_loss_forward.default
_nll_backward = torch.ops.aten.nll_loss_backward.default
_threshold_backward = torch.ops.aten.threshold_backward.default


def _check(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module) -> None:
    layers = list(model.children()) if isinstance(model, nn.Sequential) else []
    if [type(m) for m in layers] != [nn.Linear, nn.ReLU, nn.Linear]:
        raise Skip("written for a Linear-ReLU-Linear model only")
    if type(loss_fn) not in (nn.MSELoss, nn.CrossEntropyLoss) or loss_fn.reduction != "mean":
        raise Skip("written for MSELoss or CrossEntropyLoss (mean) only")
    group = optimizer.param_groups[0]
    if type(optimizer) is not torch.optim.Adam or group["amsgrad"] or group["maximize"]:
        raise Skip("written for plain torch.optim.Adam only")


def _gathered(data: Data, batch_size: int, g: torch.Generator):
    """The eager loop's batches (same permutations), gathered with bare index_select calls."""
    while True:
        for index in torch.randperm(data[0].shape[0], device=data[0].device, generator=g).split(batch_size):
            yield tuple(t.index_select(0, index) for t in data)


def raw_floor(w: Workload, data: Data, device: torch.device) -> Runner:
    model, optimizer, loss_fn = w.build(device)
    _check(model, optimizer, loss_fn)
    first, _, second = model
    params = [p.detach().clone() for p in (first.weight, first.bias, second.weight, second.bias)]
    w1, b1, w2, b2 = params
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    state_steps = [torch.zeros((), device=device) for _ in params]
    group = optimizer.param_groups[0]
    (beta1, beta2), decay = group["betas"], group["weight_decay"]
    adam = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=decay, eps=group["eps"])
    classify = isinstance(loss_fn, nn.CrossEntropyLoss)
    one = torch.ones((), device=device)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = torch.addmm(b1, x, w1.t())
        act = torch.relu(hidden)
        out = torch.addmm(b2, act, w2.t())
        if classify:
            logp = torch.log_softmax(out, 1)
            loss, total_weight = _nll_forward(logp, y, None, 1, -100)
            grad_logp = _nll_backward(one, logp, y, None, 1, -100, total_weight)
            grad_out = torch._log_softmax_backward_data(grad_logp, logp, 1, logp.dtype)
        else:
            diff = out - y
            loss = torch._C._nn.mse_loss(out, y, 1)  # reduction: 1 = mean
            grad_out = diff.mul_(2.0 / diff.numel())
        grad_act = grad_out.mm(w2)
        grad_hidden = _threshold_backward(grad_act, act, 0)
        grads = [grad_hidden.t().mm(x), grad_hidden.sum(0), grad_out.t().mm(act), grad_out.sum(0)]
        torch._foreach_add_(state_steps, 1)  # torch.optim counts the step before the fused kernel runs
        torch._fused_adam_(
            params, grads, exp_avgs, exp_avg_sqs, [], state_steps, amsgrad=False, maximize=False, **adam
        )
        return loss

    batches = _gathered(data, w.batch_size, generator(device))

    def run() -> float:
        total = torch.zeros((), device=device)
        for _ in range(w.steps):
            total += step(*next(batches))
        return (total / w.steps).item()  # full batches: the mean of batch means is the sample mean

    return Runner(run)
