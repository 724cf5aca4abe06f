"""fit_many's optimizer update: one pass over K stacked models' flat ``[K, P]`` tensors with per-model
hyperparameters, op for op what torch.optim's single-tensor SGD/Adam/AdamW do per model (traced into the
step's update graphs), with torch.optim's own state tensors made views of the stacked rows.

A model that does not take part in a step (frozen, or out of batches at an epoch's end) gets weights that
make every op the identity on its row, so its parameters and state stay bitwise as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._native import _C

# torch.optim classes and the options that must be equal across the K optimizers (flags that change the
# op sequence); the numeric hyperparameters may differ per model.
_FLAGS = {
    torch.optim.SGD: ("nesterov", "maximize", "differentiable"),
    torch.optim.Adam: ("amsgrad", "maximize", "differentiable", "decoupled_weight_decay"),
    torch.optim.AdamW: ("amsgrad", "maximize", "differentiable"),
}


def refusal_reason(
    optimizers: Sequence[torch.optim.Optimizer], params: Sequence[Sequence[Any]]
) -> str | None:
    """Why the stacked update cannot stand in for these K optimizers, or None. ``params[k]`` are model k's
    trainable parameters in the stacked order."""
    kinds = {type(o) for o in optimizers}
    if len(kinds) != 1:
        return f"the optimizers are of different classes ({', '.join(sorted(k.__name__ for k in kinds))})"
    kind = kinds.pop()
    if kind not in _FLAGS:
        return f"fit_many stacks only SGD, Adam and AdamW, not {kind.__name__}"
    for name in _FLAGS[kind]:
        values = {bool(g.get(name, False)) for o in optimizers for g in o.param_groups}
        if len(values) > 1:
            return f"the optimizers disagree on {name}, which changes the update's op sequence"
    if any(g.get("differentiable", False) for o in optimizers for g in o.param_groups):
        return "differentiable optimizers are not stacked"
    for k, (optimizer, own) in enumerate(zip(optimizers, params, strict=True)):
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        if {id(p) for p in stepped} != {id(p) for p in own} or len(stepped) != len(own):
            return (
                f"optimizer {k} does not step exactly model {k}'s trainable parameters (each optimizer must "
                "hold each of its model's trainable parameters once, and nothing else)"
            )
        for g in optimizer.param_groups:
            if isinstance(g.get("lr"), torch.Tensor) and g["lr"].numel() != 1:
                return f"optimizer {k} has a non-scalar tensor lr"
    return None


class StackedOptimizer:
    """The K optimizers' update over flat ``[K, P]`` parameter rows; ``bind`` makes torch.optim's state
    tensors views of the stacked rows, ``store`` publishes step counts and first-time state entries."""

    def __init__(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        params: Sequence[Sequence[torch.Tensor]],
        flat: torch.Tensor,
        offsets: Sequence[tuple[int, int]],
    ) -> None:
        self.optimizers, self.params, self.flat, self.offsets = list(optimizers), params, flat, offsets
        self.kind = type(optimizers[0])
        group = optimizers[0].param_groups[0]
        self.maximize = bool(group.get("maximize", False))
        self.K = flat.shape[0]
        zeros = torch.zeros_like(flat)
        if self.kind is torch.optim.SGD:
            self.nesterov = bool(group.get("nesterov", False))
            self.buf = zeros
            self.fresh = torch.ones(self.K, 1, dtype=torch.bool)  # no momentum buffer yet
        else:
            self.amsgrad = bool(group.get("amsgrad", False))
            self.decoupled = self.kind is torch.optim.AdamW or bool(
                group.get("decoupled_weight_decay", False)
            )
            self.exp_avg, self.exp_avg_sq = zeros, torch.zeros_like(flat)
            self.max_exp_avg_sq = torch.zeros_like(flat) if self.amsgrad else None
            self.steps = torch.zeros(self.K, 1, dtype=torch.float64)
        self.single_group = all(len(o.param_groups) == 1 for o in self.optimizers)
        # as fit's native optimizers: the fused kernel only for optimizers the user built fused=True
        self.fused = all(bool(g.get("fused")) for o in self.optimizers for g in o.param_groups)
        self.row_optimizer: Any = None
        self.hypers = self._read_hypers()
        if self.kind is torch.optim.SGD:
            self.state = {"buf": self.buf, "fresh": self.fresh}
        else:
            self.state = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}
            if self.amsgrad:
                self.state["max_exp_avg_sq"] = self.max_exp_avg_sq
        self.weights = self._weights()
        self.published = [False] * self.K  # optimizer k's state entries are the stacked views
        # whether any model decays its weights: the traced updates leave the decay ops out when none does
        self.use_wd = bool((self.hypers["weight_decay"] != 0).any())
        self._hyper_key: Any = None
        # torch.optim's per-parameter step tensors, as views: [k][i]
        self.step_rows = torch.zeros(self.K, len(params[0]), dtype=torch.float32)
        self.step_views = [list(row.unbind(0)) for row in self.step_rows.unbind(0)]
        # [key][k][i]: model k's row of state ``key`` for parameter i, shaped like the parameter
        self.views = {
            key: [
                [rows[k, a:b].view(p.shape) for p, (a, b) in zip(self.params[k], offsets, strict=True)]
                for k in range(self.K)
            ]
            for key, rows in self._keys()
        }

    # -- hyperparameters ----------------------------------------------------------------------------
    def _hyper(self, name: str, pick: Any = None) -> torch.Tensor:
        """``[K, 1]`` (``[K, P]`` when an optimizer has several param groups) float64 values of ``name``."""
        if self.single_group:
            values = [o.param_groups[0][name] for o in self.optimizers]
            return torch.tensor(
                [[float(pick(v) if pick is not None else v)] for v in values], dtype=torch.float64
            )
        values = torch.empty(self.K, self.flat.shape[1], dtype=torch.float64)
        for k, optimizer in enumerate(self.optimizers):
            group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            for p, (start, end) in zip(self.params[k], self.offsets, strict=True):
                value = group_of[id(p)][name]
                values[k, start:end] = float(pick(value) if pick is not None else value)
        return values

    def _read_hypers(self) -> dict[str, torch.Tensor]:
        names: dict[str, tuple[str, Any]] = {"lr": ("lr", None), "weight_decay": ("weight_decay", None)}
        if self.kind is torch.optim.SGD:
            names.update(momentum=("momentum", None), dampening=("dampening", None))
        else:
            names.update(beta1=("betas", lambda b: b[0]), beta2=("betas", lambda b: b[1]), eps=("eps", None))
        return {key: self._hyper(name, pick) for key, (name, pick) in names.items()}

    def begin_window(self) -> None:
        """Reads the param groups afresh into the hyperparameter tensors (``lr`` may change between
        events); the traced update reads those tensors."""
        key = tuple(
            tuple(
                (
                    g["lr"],
                    g["weight_decay"],
                    g.get("momentum"),
                    g.get("dampening"),
                    g.get("betas"),
                    g.get("eps"),
                )
                for g in o.param_groups
            )
            for o in self.optimizers
        )
        if key == self._hyper_key:
            return
        self._hyper_key = key
        for key, value in self._read_hypers().items():
            self.hypers[key].copy_(value)
        self.use_wd = bool((self.hypers["weight_decay"] != 0).any())
        for key, value in self._weights().items():
            self.weights[key].copy_(value)
        if self.row_optimizer is not None:
            h = {key: value[:, 0].tolist() for key, value in self.hypers.items()}
            none = [0.0] * self.K
            self.row_optimizer.set_hypers(
                h["lr"],
                h["weight_decay"],
                h.get("momentum", none),
                h.get("dampening", none),
                h.get("beta1", none),
                h.get("beta2", none),
                h.get("eps", none),
            )

    def make_row_optimizer(self, last_grad: torch.Tensor) -> Any:
        """The fused per-row update (``_C.RowOptimizer``) when every optimizer was built ``fused=True``,
        each with one param group, on the CPU; else None (the traced op-for-op update graphs)."""
        if not (self.fused and self.single_group and self.flat.device.type == "cpu"):
            return None
        if self.kind is torch.optim.SGD:
            kind, state = "sgd", [self.buf, self.fresh]
            nesterov, amsgrad, decoupled = self.nesterov, False, False
        else:
            kind, state = "adam", [self.exp_avg, self.exp_avg_sq, self.steps]
            if self.amsgrad:
                state.append(self.max_exp_avg_sq)
            nesterov, amsgrad, decoupled = False, self.amsgrad, self.decoupled
        self.row_optimizer = _C.RowOptimizer(
            kind, self.flat, last_grad, state, self.maximize, nesterov, amsgrad, decoupled
        )
        self._hyper_key = None  # the next begin_window hands it the hyperparameters
        return self.row_optimizer

    def _weights(self) -> dict[str, torch.Tensor]:
        """The per-window constants of the unmasked update, in the dtype each op uses."""
        h, dtype = self.hypers, self.flat.dtype
        if self.kind is torch.optim.SGD:
            return {
                "wd": h["weight_decay"].to(dtype),
                "momentum": h["momentum"].to(dtype),
                "take": (1 - h["dampening"]).to(dtype),
                "neg_lr": (-h["lr"]).to(dtype),
            }
        return {
            "wd": h["weight_decay"].to(dtype),
            "decay": (1 - h["lr"] * h["weight_decay"]).to(dtype),
            "w1": (1 - h["beta1"]).to(dtype),
            "b2": h["beta2"].to(dtype),
            "c2": (1 - h["beta2"]).to(dtype),
            "eps": h["eps"].to(dtype),
            "lr": h["lr"].clone(),
            "beta1": h["beta1"].clone(),
            "beta2": h["beta2"].clone(),
        }

    def fast_tensors(self) -> list[torch.Tensor]:
        """What :meth:`update_all` reads and writes besides the parameters and gradient, in its order."""
        return [*self.state.values(), *self.weights.values()]

    def fresh_rows(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(fresh, needs_fresh)``: :meth:`update_all` stands for :meth:`update` with every row on unless
        a row of ``fresh`` (SGD: no momentum buffer yet, updated by the traced update) is set where
        ``needs_fresh`` is (the model has momentum); ``(None, None)`` when it always does."""
        if self.kind is not torch.optim.SGD:
            return None, None
        return self.fresh, (self.hypers["momentum"] != 0).any(dim=1, keepdim=True)

    def update_all(self, param: torch.Tensor, grad: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """:meth:`update` with every row on, without the masks (the common step), traced likewise."""
        state = dict(zip(self.state, tensors[: len(self.state)], strict=True))
        w = dict(zip(self.weights, tensors[len(self.state) :], strict=True))
        if self.maximize:
            grad = -grad
        if self.kind is torch.optim.SGD:
            if self.use_wd:
                grad = grad + param * w["wd"]
            buf = state["buf"]
            buf.mul_(w["momentum"]).add_(grad * w["take"])
            step = grad + buf * w["momentum"] if self.nesterov else buf
            param.add_(step * w["neg_lr"])
            return
        steps = state["steps"]
        steps.add_(1)
        if self.use_wd and self.decoupled:
            param.mul_(w["decay"])
        elif self.use_wd:
            grad = grad + param * w["wd"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, w["w1"])
        exp_avg_sq.mul_(w["b2"]).addcmul_(grad * w["c2"], grad)
        bias_correction1 = 1 - w["beta1"] ** steps
        bias_correction2_sqrt = (1 - w["beta2"] ** steps) ** 0.5
        neg_step_size = (-(w["lr"] / bias_correction1)).to(param.dtype)
        second = exp_avg_sq
        if self.amsgrad:
            state["max_exp_avg_sq"].copy_(torch.maximum(state["max_exp_avg_sq"], exp_avg_sq))
            second = state["max_exp_avg_sq"]
        denom = (second.sqrt() / bias_correction2_sqrt.to(param.dtype)).add_(w["eps"])
        param.addcdiv_(exp_avg * neg_step_size, denom)

    def tensors(self) -> list[torch.Tensor]:
        """What the traced update reads and writes besides the parameters and gradient, in its order."""
        return [*self.state.values(), *self.hypers.values()]

    # -- the update -----------------------------------------------------------------------------------
    def update(
        self, param: torch.Tensor, grad: torch.Tensor, on: torch.Tensor, tensors: Sequence[torch.Tensor]
    ) -> None:
        """One update of the rows in ``on`` (``[K, 1]`` bool), written in place with tensor ops only (it is
        traced into the step's graph); ``tensors`` as :meth:`tensors` orders them. Rows not in ``on`` stay
        bitwise unchanged: their gradient is zeroed and every weight made an identity."""
        state = dict(zip(self.state, tensors[: len(self.state)], strict=True))
        h = dict(zip(self.hypers, tensors[len(self.state) :], strict=True))
        dtype = param.dtype

        def keep(value: torch.Tensor, identity: float) -> torch.Tensor:
            return torch.where(on, value, torch.full_like(value, identity))

        grad = torch.where(on, grad, torch.zeros_like(grad))
        if self.maximize:
            grad = -grad
        lr = keep(h["lr"], 0.0)
        if self.kind is torch.optim.SGD:
            if self.use_wd:
                grad = grad + param * h["weight_decay"].to(dtype)
            buf, fresh = state["buf"], state["fresh"]
            first = fresh & on
            keep_buf = torch.where(first, torch.zeros_like(h["momentum"]), keep(h["momentum"], 1.0))
            take = torch.where(first, torch.ones_like(h["dampening"]), keep(1 - h["dampening"], 0.0))
            buf.mul_(keep_buf.to(dtype)).add_(grad * take.to(dtype))
            fresh.logical_and_(~on)
            step = grad + buf * h["momentum"].to(dtype) if self.nesterov else buf
            param.add_(step * (-lr).to(dtype))
            return
        steps = state["steps"]
        steps.add_(on.to(steps.dtype))
        if self.use_wd and self.decoupled:
            param.mul_(keep(1 - h["lr"] * h["weight_decay"], 1.0).to(dtype))
        elif self.use_wd:
            grad = grad + param * h["weight_decay"].to(dtype)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, keep(1 - h["beta1"], 0.0).to(dtype))
        exp_avg_sq.mul_(keep(h["beta2"], 1.0).to(dtype)).addcmul_(
            grad * keep(1 - h["beta2"], 0.0).to(dtype), grad
        )
        taken = torch.where(on, steps, torch.ones_like(steps))
        bias_correction1 = 1 - h["beta1"] ** taken
        bias_correction2_sqrt = (1 - h["beta2"] ** taken) ** 0.5
        neg_step_size = (-(lr / bias_correction1)).to(dtype)
        second = exp_avg_sq
        if self.amsgrad:
            state["max_exp_avg_sq"].copy_(torch.maximum(state["max_exp_avg_sq"], exp_avg_sq))
            second = state["max_exp_avg_sq"]
        denom = (second.sqrt() / bias_correction2_sqrt.to(dtype)).add_(h["eps"].to(dtype))
        param.addcdiv_(exp_avg * neg_step_size, denom)

    # -- torch.optim's state in and out ---------------------------------------------------------------
    def _keys(self) -> list[tuple[str, torch.Tensor]]:
        if self.kind is torch.optim.SGD:
            return [("momentum_buffer", self.buf)]
        keys = [("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)]
        return keys + ([("max_exp_avg_sq", self.max_exp_avg_sq)] if self.max_exp_avg_sq is not None else [])

    def bind(self) -> None:
        """Makes each optimizer's torch.optim state tensors views of the stacked rows (copying in any that
        are not, e.g. after ``load_state_dict``), so the fused update writes torch.optim's own state; reads
        each model's step count back from those views (a plain step between events moves them)."""
        sgd = self.kind is torch.optim.SGD
        keys = [key for key, _ in self._keys()]
        fresh = []
        with torch.no_grad():
            for k, optimizer in enumerate(self.optimizers):
                model_fresh = False
                for i, p in enumerate(self.params[k]):
                    state = optimizer.state.get(p)
                    if sgd:
                        buf = None if state is None else state.get("momentum_buffer")
                        if buf is None:
                            model_fresh = True
                            self.published[k] = False
                            continue
                        view = self.views["momentum_buffer"][k][i]
                        if buf is not view:
                            view.copy_(buf)
                            state["momentum_buffer"] = view
                        continue
                    step_view = self.step_views[k][i]
                    if state is None or "step" not in state:
                        self.published[k] = False
                        step_view.zero_()
                        for key in keys:
                            self.views[key][k][i].zero_()
                        continue
                    for key in keys:
                        view = self.views[key][k][i]
                        if state[key] is not view:
                            view.copy_(state[key])
                            state[key] = view
                    if state["step"] is not step_view:
                        step_view.fill_(float(state["step"]))
                        state["step"] = step_view
                fresh.append(model_fresh)
            if sgd:
                self.fresh.copy_(torch.tensor(fresh).reshape(self.K, 1))
                return
            rows = self.step_rows
            uneven = (rows != rows[:, :1]).any(dim=1)
            if bool(uneven.any()):
                k = int(uneven.nonzero()[0])
                raise ValueError(
                    f"optimizer {k}'s parameters have taken different numbers of steps "
                    f"({sorted(set(rows[k].tolist()))}); fit_many needs one step count per model"
                )
            self.steps.copy_(rows[:, :1])

    def store(self, took_steps: Sequence[bool]) -> None:
        """Publishes the step counts and creates the state entries of models that took their first step
        (as views). Models that never took a step keep an empty state, and SGD keeps none without
        momentum, as torch.optim does."""
        sgd = self.kind is torch.optim.SGD
        keys = [key for key, _ in self._keys()]
        with torch.no_grad():
            if not sgd:
                self.step_rows.copy_(self.steps.to(torch.float32).expand_as(self.step_rows))
            for k, optimizer in enumerate(self.optimizers):
                if self.published[k] or not took_steps[k]:
                    continue
                if sgd and bool(self.fresh[k]):
                    continue
                group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
                for i, p in enumerate(self.params[k]):
                    if sgd:
                        if group_of[id(p)]["momentum"] != 0:
                            optimizer.state[p]["momentum_buffer"] = self.views["momentum_buffer"][k][i]
                        continue
                    state = optimizer.state[p]
                    state["step"] = self.step_views[k][i]
                    for key in keys:
                        state[key] = self.views[key][k][i]
                self.published[k] = True

    def unbind(self) -> None:
        """torch.optim's state tensors get their own storage back (the stream ended)."""
        with torch.no_grad():
            for optimizer, params in zip(self.optimizers, self.params, strict=True):
                for p in params:
                    state = optimizer.state.get(p)
                    for key, value in (state or {}).items():
                        if isinstance(value, torch.Tensor):
                            state[key] = value.clone()
