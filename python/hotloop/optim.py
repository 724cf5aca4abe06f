"""Native optimizers: torch.optim's optimizers stepped from C++ on the optimizer's own state.

Native: SGD, Adam, AdamW (fused kernels or a for-loop replica) and RMSprop, Adagrad (fused or for-loop),
Adamax, NAdam, RAdam, ASGD, Rprop, Adadelta (for-loop replicas), each with all its options except
``capturable`` and ``differentiable``; ``native_optimizer`` says why anything else is not native.

The native engine steps the optimizer with no Python per batch. At every window boundary the Python side
reads ``param_groups`` afresh and hands C++ the very tensors that live in ``optimizer.state``, which C++
then updates in place; after the window ``optimizer.state_dict()`` is what a torch.optim loop would hold.
So changing ``lr``, stepping a scheduler, saving or loading a state dict between windows all just work.

>>> import torch
>>> from hotloop.optim import configure_window, finish_window, native_optimizer
>>> w = torch.nn.Parameter(torch.ones(3))
>>> opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
>>> handle, reason = native_optimizer(opt)
>>> configure_window(handle, opt, [w])
>>> handle.step([torch.ones(3)])  # in the engine, C++ calls this once per batch
>>> finish_window(handle, opt)
>>> w.data, opt.state_dict()["state"][0]["momentum_buffer"]
(tensor([0.5000, 0.5000, 0.5000]), tensor([1., 1., 1.]))
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import ASGD, SGD, Adam, AdamW, Optimizer, SparseAdam

from ._native import _C
from ._optim_specs import SPECS, scalar_dtype

NATIVE_OPTIMIZERS = (SGD, Adam, AdamW, *SPECS)
# Their native steps take a found_inf flag: the non-finite guard off the CPU.
SKIPS_ON_DEVICE = (SGD, Adam, AdamW)


def native_optimizer(
    optimizer: Optimizer, *, fused: bool | None = None
) -> tuple[_C.NativeOptimizer | None, str | None]:
    """A native stepper for ``optimizer``, or ``(None, reason)`` saying why it cannot have one.

    ``fused=True`` runs ATen's fused kernels (``_fused_sgd_``, ``_fused_adam_``, ``_fused_adamw_``,
    ``_fused_adagrad_`` on CPU): bitwise equal to an optimizer built with ``fused=True``, a few float32 ulps
    per step from torch.optim's default for-loop implementation (which Adam can amplify into visibly
    different training where gradients are rounding noise). ``fused=False``, and every other optimizer,
    replays torch.optim's for-loop implementation op for op: bitwise equal to it on CPU. ``None`` (the
    default) does what the user's optimizer does: fused only when all its param groups are.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    reason = native_refusal(optimizer)
    if reason is not None:
        return None, reason
    if fused is None:
        fused = all(group.get("fused") for group in optimizer.param_groups)
    kind = type(optimizer)
    if kind in SPECS:
        native, options = SPECS[kind].handle(fused)
    else:
        native, options = (_C.SGD if kind is SGD else _C.Adam), {"fused": fused}
    return _with_window_state(native)(**options), None


class _WindowState:
    """What a native optimizer keeps on the Python side: the optimizer state ``configure_window`` created,
    which ``finish_window`` removes again when the window took no step."""

    _created_state: list[tuple[torch.Tensor, str | None]]

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._created_state = []


@functools.cache
def _with_window_state(native: type) -> type:
    """``native`` (a _C optimizer class) with the Python-side window state, as a subclass of both."""
    return type(native.__name__, (_WindowState, native), {})


def configure_window(
    handle: _C.NativeOptimizer,
    optimizer: Optimizer,
    grad_params: Sequence[torch.Tensor] | None = None,
    lrs_per_step: Sequence[Sequence[float] | None] | None = None,
    momenta_per_step: Sequence[Sequence[float] | None] | None = None,
) -> None:
    """Points ``handle`` at ``optimizer``'s current hyperparameters and state for the next window.

    Call it at every window boundary, after anything that may have changed ``param_groups`` or
    ``optimizer.state`` (an lr change, a scheduler step, ``load_state_dict``). ``grad_params`` lists the
    parameters whose gradients ``handle.step(grads)`` will receive, in that order (default: the
    optimizer's trainable parameters in ``param_groups`` order). Optimizer parameters that are not among
    them, or have ``requires_grad=False``, are left alone, as torch.optim leaves a parameter without a
    gradient. Missing state is created here exactly as torch.optim creates it on its first step.

    ``lrs_per_step``, one entry per param group, gives that group's learning rate for each step of the
    window (``None`` for a group: its ``lr``); ``momenta_per_step`` likewise the group's momentum
    (SGD, RMSprop) or beta1 (Adam, AdamW, Adamax, NAdam, RAdam). ``schedule_window`` computes both from
    a scheduler. A step beyond a given schedule fails before changing anything. State is created with
    the lr of the window's first step (what Rprop's ``step_size`` and ASGD's ``eta`` start from).
    """
    reason = native_refusal(optimizer)
    if reason is not None:
        raise RuntimeError(f"the optimizer can no longer be stepped natively: {reason}")
    groups = optimizer.param_groups
    if grad_params is None:
        grad_params = [p for group in groups for p in group["params"] if p.requires_grad]
    grad_index = {id(p): j for j, p in enumerate(grad_params)}
    for name, schedule in (("lrs_per_step", lrs_per_step), ("momenta_per_step", momenta_per_step)):
        if schedule is not None and len(schedule) != len(groups):
            raise ValueError(
                f"{name} must have one entry per param group ({len(groups)}), got {len(schedule)}"
            )

    created: list[tuple[torch.Tensor, str | None]] = []
    native_groups = []
    for gi, group in enumerate(groups):
        g = _C.OptimizerGroup()
        params = [p for p in group["params"] if p.requires_grad and id(p) in grad_index]
        g.params = params
        g.grad_index = [grad_index[id(p)] for p in params]
        g.lr = float(group["lr"])
        if lrs_per_step is not None and lrs_per_step[gi] is not None:
            g.lr_per_step = [float(lr) for lr in lrs_per_step[gi]]
        if momenta_per_step is not None and momenta_per_step[gi] is not None:
            g.momentum_per_step = [float(m) for m in momenta_per_step[gi]]
        g.weight_decay = float(group.get("weight_decay", 0.0))  # Rprop has none
        g.maximize = bool(group.get("maximize", False))
        kind = type(optimizer)
        if kind is SGD:
            _configure_sgd(g, group, params, optimizer.state, created)
        elif kind in SPECS:
            # state is created as on the window's first step, whose lr a scheduler run ahead has moved on
            first = {**group, "lr": g.lr_per_step[0]} if g.lr_per_step else group
            _configure_state(g, SPECS[kind], optimizer, first, params, created)
        else:
            _configure_adam(g, group, params, optimizer.state, created)
        native_groups.append(g)
    handle.configure(native_groups, len(grad_params))
    handle._created_state = created


def finish_window(handle: _C.NativeOptimizer, optimizer: Optimizer) -> None:
    """Leaves ``optimizer`` as a torch.optim loop would after the window's steps.

    After a window that took no step, the state ``configure_window`` created is removed again (torch
    creates state on a parameter's first step only, and SGD treats an existing momentum buffer
    differently from a missing one). After steps, marks the optimizer as stepped for LR schedulers.
    """
    created = getattr(handle, "_created_state", [])
    if handle.steps_in_window == 0:
        for p, key in created:
            if key is None:
                del optimizer.state[p]
            else:
                del optimizer.state[p][key]
                if not optimizer.state[p]:
                    del optimizer.state[p]
    else:
        # what LRScheduler's wrapper around optimizer.step records, so schedulers do not warn
        optimizer._opt_called = True
    handle._created_state = []


def schedule_window(scheduler, n_steps: int) -> tuple[dict[str, list], Callable[[int], None]]:
    """Runs a per-step scheduler ahead through a window of ``n_steps`` optimizer steps.

    Returns ``(schedule, settle)``. ``schedule`` holds, per param group, the lr (``lrs_per_step``) and,
    where the scheduler cycles it (OneCycleLR, CyclicLR), the momentum or Adam's beta1
    (``momenta_per_step``) that each step of the window has in a plain loop calling
    ``scheduler.step()`` after every ``optimizer.step()``: pass it on as
    ``configure_window(..., **schedule)``. The scheduler and ``param_groups`` are left where that loop
    leaves them after ``n_steps`` steps; ``settle(steps_taken)`` after the window rewinds them to where
    it stands after ``steps_taken`` steps when the window stopped early.
    """
    optimizer = scheduler.optimizer
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    groups = optimizer.param_groups
    saved_scheduler = copy.deepcopy(scheduler.state_dict())
    saved_groups = [{k: _detached_copy(v) for k, v in group.items() if k != "params"} for group in groups]

    def rewind(steps: int) -> None:
        scheduler.load_state_dict(copy.deepcopy(saved_scheduler))
        for group, saved in zip(groups, saved_groups, strict=True):
            for key, value in saved.items():
                if torch.is_tensor(group.get(key)) and torch.is_tensor(value):
                    group[key].copy_(value)
                else:
                    group[key] = _detached_copy(value)
        for _ in range(steps):
            scheduler.step()

    momentum_key = _momentum_key(optimizer)
    fixed_keys = [k for k in optimizer.defaults if k not in ("lr", momentum_key)]
    lrs: list[list[float]] = [[] for _ in groups]
    momenta: list[list[float]] = [[] for _ in groups]
    optimizer._opt_called = True  # the window's optimizer steps come before these scheduler steps
    for _ in range(n_steps):
        for i, group in enumerate(groups):
            lrs[i].append(float(group["lr"]))
            if momentum_key is not None:
                momenta[i].append(float(_momentum_of(group, momentum_key)))
        scheduler.step()
        for group, saved in zip(groups, saved_groups, strict=True):
            changed = [k for k in fixed_keys if not _same(group.get(k), saved.get(k))]
            if momentum_key == "betas" and not _same(group["betas"][1], saved["betas"][1]):
                changed.append("betas[1]")
            if changed:
                rewind(0)
                raise ValueError(
                    f"{type(scheduler).__name__} changes {', '.join(changed)} from step to step; per-step "
                    "schedules of lr and momentum only run natively"
                )
    schedule: dict[str, list] = {"lrs_per_step": lrs}
    if momentum_key is not None:
        start_momenta = [float(_momentum_of(saved, momentum_key)) for saved in saved_groups]
        schedule["momenta_per_step"] = [
            None if all(m == start for m in group_momenta) else group_momenta
            for group_momenta, start in zip(momenta, start_momenta, strict=True)
        ]

    def settle(steps_taken: int) -> None:
        if not 0 <= steps_taken <= n_steps:
            raise ValueError(f"steps_taken must be in [0, {n_steps}], got {steps_taken}")
        if steps_taken < n_steps:
            rewind(steps_taken)

    return schedule, settle


def _momentum_key(optimizer: Optimizer) -> str | None:
    kind = type(optimizer)
    if kind in SPECS:
        return SPECS[kind].momentum_key
    return "momentum" if kind is SGD else "betas"


def _momentum_of(group, momentum_key):
    return group["momentum"] if momentum_key == "momentum" else group["betas"][0]


def _detached_copy(value):
    return value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def _configure_sgd(g, group, params, state, created) -> None:
    g.momentum = float(group["momentum"])
    g.dampening = float(group["dampening"])
    g.nesterov = bool(group["nesterov"])
    if g.momentum == 0:
        return  # torch.optim.SGD keeps no state without momentum
    buffers, is_new = [], []
    for p in params:
        param_state = state[p]
        buf = param_state.get("momentum_buffer")
        is_new.append(buf is None)
        if buf is None:
            # torch stores a clone of the first gradient; the first native step fills this one in place
            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            param_state["momentum_buffer"] = buf
            created.append((p, "momentum_buffer"))
        buffers.append(buf)
    g.momentum_buffers = buffers
    g.buffer_is_new = is_new


def _configure_adam(g, group, params, state, created) -> None:
    beta1, beta2 = group["betas"]
    g.beta1, g.beta2 = float(beta1), float(beta2)
    g.eps = float(group["eps"])
    g.amsgrad = bool(group["amsgrad"])
    g.decoupled_weight_decay = bool(group.get("decoupled_weight_decay", False))
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
    for p in params:
        param_state = state[p]
        if len(param_state) == 0:
            # as Adam._init_group does on a parameter's first step
            if group["capturable"] or group["fused"]:
                step = torch.zeros((), dtype=scalar_dtype(group["fused"]), device=p.device)
            else:
                step = torch.tensor(0.0, dtype=scalar_dtype(False))
            param_state["step"] = step
            param_state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            param_state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if g.amsgrad:
                param_state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            created.append((p, None))
        steps.append(param_state["step"])
        exp_avgs.append(param_state["exp_avg"])
        exp_avg_sqs.append(param_state["exp_avg_sq"])
        if g.amsgrad:
            max_exp_avg_sqs.append(param_state["max_exp_avg_sq"])
    g.steps = steps
    g.exp_avgs = exp_avgs
    g.exp_avg_sqs = exp_avg_sqs
    g.max_exp_avg_sqs = max_exp_avg_sqs


def _configure_state(g, spec, optimizer, group, params, created) -> None:
    g.options = spec.options(group)
    keys = spec.state_keys(group)
    lists: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for p in params:
        param_state = optimizer.state[p]
        if len(param_state) == 0:
            param_state.update(spec.new_state(optimizer, group, p))
            created.append((p, None))
        for key in keys:
            lists[key].append(param_state[key])
    g.state = lists


def native_refusal(optimizer: Optimizer) -> str | None:
    """Why ``optimizer`` cannot be stepped natively (its kind, hooks, options or state), or None."""
    kind = type(optimizer)
    name = kind.__name__
    if kind not in NATIVE_OPTIMIZERS:
        return _not_native_reason(optimizer)
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return f"{name} has step hooks, which would have to run in Python at every step"
    from torch.optim import optimizer as optimizer_module

    if optimizer_module._global_optimizer_pre_hooks or optimizer_module._global_optimizer_post_hooks:
        return "global optimizer step hooks are registered, which would have to run in Python at every step"
    step = vars(optimizer).get("step")
    if step is not None and not getattr(step, "_wrapped_by_lr_sched", False):
        return f"{name}.step was replaced on the instance, and the native optimizer would bypass it"
    if kind is ASGD and torch.get_default_dtype() not in (torch.float32, torch.float64):
        return (
            f"ASGD with default dtype {torch.get_default_dtype()} is not native (its eta and mu pass "
            "through that dtype)"
        )
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("differentiable", False):
            return f"{name} with differentiable=True is not native"
        if kind in SPECS and group.get("capturable", False):
            return (
                f"{name} with capturable=True is not native (hotloop replays its capturable=False step, "
                "whose arithmetic differs)"
            )
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if p.layout != torch.strided:
                return f"{name} on a {p.layout} parameter is not native (param group {gi})"
            if kind in SPECS:
                reason = _state_reason(name, SPECS[kind], group, optimizer.state.get(p))
            elif kind is not SGD:
                reason = _adam_state_reason(name, group, optimizer.state.get(p), p)
            else:
                reason = None
            if reason is not None:
                return f"{reason} (param group {gi})"
    return None


def _not_native_reason(optimizer: Optimizer) -> str:
    name = type(optimizer).__name__
    if requires_closure(optimizer):
        return (
            f"{name}.step requires a closure (it re-evaluates the loss within a step), which only the "
            "python engine can call"
        )
    if isinstance(optimizer, SparseAdam):
        return "SparseAdam steps sparse gradients only, and the native engine computes dense ones"
    natives = ", ".join(kind.__name__ for kind in NATIVE_OPTIMIZERS)
    return f"{name} is not native (native optimizers: torch.optim's {natives} themselves, not subclasses)"


def requires_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` has a required ``closure`` parameter (LBFGS's does)."""
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _state_reason(name, spec, group, param_state) -> str | None:
    if not param_state:
        return None
    missing = [key for key in spec.state_keys(group) if key not in param_state]
    if missing:
        return f"{name} state of a parameter lacks {', '.join(missing)}"
    if not torch.is_tensor(param_state["step"]):
        return f"{name} state of a parameter has a step that is not a tensor"
    return None


def _adam_state_reason(name, group, param_state, p) -> str | None:
    if group["capturable"] and not group["fused"] and p.device.type != "cuda":
        return f"{name} with capturable=True needs CUDA parameters, got one on {p.device.type}"
    if not param_state:
        return None
    missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in param_state]
    if group["amsgrad"] and "max_exp_avg_sq" not in param_state:
        missing.append("max_exp_avg_sq")
    if missing:
        return f"{name} state of a parameter lacks {', '.join(missing)}"
    if not torch.is_tensor(param_state["step"]):
        return f"{name} state of a parameter has a step that is not a tensor"
    return None
