"""How each torch.optim optimizer after SGD and Adam maps onto its native stepper (csrc/optim/for_loop.h).

Per class: the native handle, the hyperparameters C++ reads (``OptimizerGroup.options``), the state keys its
step reads (``OptimizerGroup.state``) and the state a parameter gets on its first step, created exactly as
the class's ``_init_group`` creates it (capturable=False: capturable groups are refused before this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import ASGD, Adadelta, Adagrad, Adamax, NAdam, Optimizer, RAdam, RMSprop, Rprop
from torch.optim.optimizer import _to_scalar

from ._native import _C


@dataclass(frozen=True)
class Spec:
    handle: Callable[[bool], tuple[type, dict[str, Any]]]  # fused -> (the _C stepper class, its options)
    # the group key a cycling scheduler (OneCycleLR, CyclicLR) changes per step: "momentum", "betas" or None
    momentum_key: str | None
    options: Callable[[dict], dict[str, float]]
    state_keys: Callable[[dict], tuple[str, ...]]  # what the step reads, in torch's creation order
    new_state: Callable[[Optimizer, dict, torch.Tensor], dict[str, torch.Tensor]]


def scalar_dtype(fused: bool = False) -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _cpu_step() -> torch.Tensor:
    return torch.tensor(0.0, dtype=scalar_dtype())


def _zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _betas(group) -> dict[str, float]:
    beta1, beta2 = group["betas"]
    return {"beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"])}


def _rmsprop_keys(group) -> tuple[str, ...]:
    return (
        "step",
        "square_avg",
        *(("momentum_buffer",) if group["momentum"] > 0 else ()),
        *(("grad_avg",) if group["centered"] else ()),
    )


def _rmsprop_state(optimizer, group, p):
    state = {"step": torch.zeros((), dtype=scalar_dtype()), "square_avg": _zeros(p)}
    if group["momentum"] > 0:
        state["momentum_buffer"] = _zeros(p)
    if group["centered"]:
        state["grad_avg"] = _zeros(p)
    return state


def _adagrad_state(optimizer, group, p):
    init = optimizer.defaults["initial_accumulator_value"]  # the defaults', as Adagrad._init_group reads it
    step = torch.zeros((), dtype=scalar_dtype(True), device=p.device) if group["fused"] else _cpu_step()
    value = complex(init, init) if torch.is_complex(p) else init
    return {"step": step, "sum": torch.full_like(p, value, memory_format=torch.preserve_format)}


def _asgd_state(optimizer, group, p):
    dtype = scalar_dtype()
    return {
        "step": torch.zeros((), device=p.device, dtype=dtype),
        "eta": torch.as_tensor(_to_scalar(group["lr"]), device=p.device, dtype=dtype).clone().detach(),
        "mu": torch.ones((), device=p.device, dtype=dtype),
        "ax": _zeros(p),
    }


def _rprop_state(optimizer, group, p):
    # torch fills step_size like the gradient, which autograd lays out like the parameter
    lr = group["lr"]
    fill = complex(lr, lr) if p.dtype.is_complex else _to_scalar(lr)
    return {
        "step": torch.zeros((), dtype=scalar_dtype()),
        "prev": _zeros(p),
        "step_size": torch.full_like(p, fill),
    }


SPECS: dict[type, Spec] = {
    RMSprop: Spec(
        handle=lambda fused: (_C.RMSprop, {}),
        momentum_key="momentum",
        options=lambda g: {
            "alpha": float(g["alpha"]),
            "eps": float(g["eps"]),
            "momentum": float(g["momentum"]),
            "centered": float(bool(g["centered"])),
        },
        state_keys=_rmsprop_keys,
        new_state=_rmsprop_state,
    ),
    Adagrad: Spec(
        handle=lambda fused: (_C.Adagrad, {"fused": fused}),
        momentum_key=None,
        options=lambda g: {"lr_decay": float(g["lr_decay"]), "eps": float(g["eps"])},
        state_keys=lambda g: ("step", "sum"),
        new_state=_adagrad_state,
    ),
    Adamax: Spec(
        handle=lambda fused: (_C.Adamax, {}),
        momentum_key="betas",
        options=_betas,
        state_keys=lambda g: ("step", "exp_avg", "exp_inf"),
        new_state=lambda o, g, p: {"step": _cpu_step(), "exp_avg": _zeros(p), "exp_inf": _zeros(p)},
    ),
    NAdam: Spec(
        handle=lambda fused: (_C.NAdam, {}),
        momentum_key="betas",
        options=lambda g: {
            **_betas(g),
            "momentum_decay": float(g["momentum_decay"]),
            "decoupled_weight_decay": float(bool(g["decoupled_weight_decay"])),
        },
        state_keys=lambda g: ("step", "mu_product", "exp_avg", "exp_avg_sq"),
        new_state=lambda o, g, p: {
            "step": _cpu_step(),
            "mu_product": torch.tensor(1.0, dtype=scalar_dtype()),
            "exp_avg": _zeros(p),
            "exp_avg_sq": _zeros(p),
        },
    ),
    RAdam: Spec(
        handle=lambda fused: (_C.RAdam, {}),
        momentum_key="betas",
        options=lambda g: {**_betas(g), "decoupled_weight_decay": float(bool(g["decoupled_weight_decay"]))},
        state_keys=lambda g: ("step", "exp_avg", "exp_avg_sq"),
        new_state=lambda o, g, p: {"step": _cpu_step(), "exp_avg": _zeros(p), "exp_avg_sq": _zeros(p)},
    ),
    ASGD: Spec(
        handle=lambda fused: (_C.ASGD, {}),
        momentum_key=None,
        options=lambda g: {
            "lambd": float(g["lambd"]),
            "alpha": float(g["alpha"]),
            "t0": float(g["t0"]),
            "default_float64": float(torch.get_default_dtype() == torch.float64),
        },
        state_keys=lambda g: ("step", "eta", "mu", "ax"),
        new_state=_asgd_state,
    ),
    Rprop: Spec(
        handle=lambda fused: (_C.Rprop, {}),
        momentum_key=None,
        options=lambda g: {
            "etaminus": float(g["etas"][0]),
            "etaplus": float(g["etas"][1]),
            "step_size_min": float(g["step_sizes"][0]),
            "step_size_max": float(g["step_sizes"][1]),
        },
        state_keys=lambda g: ("step", "prev", "step_size"),
        new_state=_rprop_state,
    ),
    Adadelta: Spec(
        handle=lambda fused: (_C.Adadelta, {}),
        momentum_key=None,
        options=lambda g: {"rho": float(g["rho"]), "eps": float(g["eps"])},
        state_keys=lambda g: ("step", "square_avg", "acc_delta"),
        new_state=lambda o, g, p: {"step": _cpu_step(), "square_avg": _zeros(p), "acc_delta": _zeros(p)},
    ),
}
