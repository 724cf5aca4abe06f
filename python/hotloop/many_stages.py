"""Stream stages for fit_many's events, whose ``model`` is a list of K models: per-model validation in one
stacked (vmap) pass, per-model early stopping that freezes each model alone, and per-model best states."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from copy import deepcopy
from math import isfinite
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from . import _checks as check
from .fidelity import refusal_reason


def validation_loss_many(
    val_data: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    subsets: Sequence[torch.Tensor] | None = None,
    key: str = "val_loss",
    last_label: bool = True,
    batch_size: int | None = None,
) -> Callable[[dict[str, Any]], dict[str, list[float]]]:
    """An ``augment`` callback adding ``key``: a list with each model's ``loss_fn`` on ``val_data`` (or
    on its own ``val_data[subsets[k]]``, e.g. :func:`kfold`'s held-out folds), all K models scored in one
    stacked ``vmap`` pass per batch, in eval mode without gradients (modes restored afterwards).

    With ``batch_size`` the loss must be a batch mean; each model's value is the sample-weighted mean
    over its batches. Models that cannot be stacked (hooks, differing architectures) are scored one
    after another.
    """
    tensors = check.check_tensors("val_data", val_data, last_label=last_label)
    check.check_callable("loss_fn", loss_fn)
    n = tensors[0].shape[0]
    if batch_size is not None:
        check.check_int("batch_size", batch_size, minimum=1)
    index_sets = None
    if subsets is not None:
        index_sets = [torch.as_tensor(s, dtype=torch.int64) for s in subsets]
        for k, s in enumerate(index_sets):
            if s.dim() != 1 or s.numel() == 0 or int(s.min()) < 0 or int(s.max()) >= n:
                raise ValueError(f"subsets[{k}] must be a non-empty 1-D index tensor into val_data")

    def compute(event: dict[str, Any]) -> dict[str, list[float]]:
        models = list(event["model"])
        K = len(models)
        if index_sets is not None and len(index_sets) != K:
            raise ValueError(f"validation_loss_many has {len(index_sets)} subsets for {K} models")
        modes = [(m, m.training) for model in models for m in model.modules()]
        try:
            for model in models:
                model.eval()
            with torch.no_grad():
                return {key: _scores(models, tensors, loss_fn, index_sets, last_label, batch_size)}
        finally:
            for module, training in modes:
                module.training = training

    return compute


def _scores(
    models: list[nn.Module],
    tensors: list[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    index_sets: list[torch.Tensor] | None,
    last_label: bool,
    batch_size: int | None,
) -> list[float]:
    K, n = len(models), tensors[0].shape[0]
    device = tensors[0].device
    sets = index_sets if index_sets is not None else [torch.arange(n)] * K
    sets = [s.to(device) for s in sets]
    stackable = (
        all(refusal_reason(m, loss_fn) is None for m in models)
        and len({tuple((k, v.shape) for k, v in m.state_dict().items()) for m in models}) == 1
    )
    totals = [0.0] * K
    common = min(len(s) for s in sets)
    if stackable:
        params, buffers = stack_module_state(models)
        base = models[0]

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *batch: torch.Tensor) -> torch.Tensor:
            inputs = batch[:-1] if last_label else batch
            pred = functional_call(base, (p, b), tuple(inputs))
            return loss_fn(pred, batch[-1]) if last_label else loss_fn(pred)

        shared = index_sets is None
        run = vmap(one, in_dims=(0, 0, *((None if shared else 0),) * len(tensors)))
        step = batch_size or common
        for start in range(0, common, step):
            size = min(step, common - start)
            if shared:
                batch = [t[start : start + size] for t in tensors]
            else:
                idx = torch.stack([s[start : start + size] for s in sets])
                batch = [t[idx] for t in tensors]
            values = run(params, buffers, *batch)
            for k in range(K):
                totals[k] += float(values[k]) * size
        done = common
    else:
        done = 0
    for k, model in enumerate(models):
        rest = sets[k][done:]
        step = batch_size or max(len(rest), 1)
        for start in range(0, len(rest), step):
            idx = rest[start : start + step]
            batch = [t[idx] for t in tensors]
            inputs = batch[:-1] if last_label else batch
            pred = model(*inputs)
            value = loss_fn(pred, batch[-1]) if last_label else loss_fn(pred)
            totals[k] += float(value) * len(idx)
    return [totals[k] / len(sets[k]) for k in range(K)]


def early_stop_each(
    key: str, patience: int, *, mode: Literal["min", "max"] = "min", min_delta: float = 0.0
) -> Callable[[Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]:
    """A stage for :func:`fit_many` streams: freezes model k (``event["model"].freeze(k)``) once
    ``event[key][k]`` has not improved for ``patience`` events in a row, and ends the stream after the
    event in which the last model froze (by this stage or a non-finite loss). Improvement as in
    :func:`early_stop`."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    check.check_int("patience", patience, minimum=1)
    if mode not in ("min", "max"):
        raise ValueError("mode must be one of {'min', 'max'}.")

    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        best: list[float | None] = []
        stale: list[int] = []
        for event in events:
            values = [float(v) for v in event[key]]
            if not best:
                best, stale = [None] * len(values), [0] * len(values)
            active = list(event.get("active", [True] * len(values)))
            for k, value in enumerate(values):
                if not active[k]:
                    continue
                b = best[k]
                improved = b is None or (value < b - min_delta if mode == "min" else value > b + min_delta)
                if improved:
                    best[k], stale[k] = value, 0
                else:
                    stale[k] += 1
                    if stale[k] >= patience:
                        event["model"].freeze(k)
                        active[k] = False
            event["active"] = active
            yield event
            if not any(active):
                return

    return stage


class BestModels:
    """The ``tap`` callback of :func:`best_each`: each model's state at its best ``event[key][k]``."""

    def __init__(self, key: str, direction: Literal["min", "max"]) -> None:
        if direction not in ("min", "max"):
            raise ValueError("direction must be one of {'min', 'max'}.")
        self.key, self.direction = key, direction
        self.best: list[float | None] = []
        self.states: list[dict[str, Any] | None] = []

    def __call__(self, event: dict[str, Any]) -> None:
        values = [float(v) for v in event[self.key]]
        if not self.best:
            self.best, self.states = [None] * len(values), [None] * len(values)
        for k, (value, model) in enumerate(zip(values, event["model"], strict=True)):
            b = self.best[k]
            if not isfinite(value) or (
                b is not None and (value >= b if self.direction == "min" else value <= b)
            ):
                continue
            self.best[k] = value
            self.states[k] = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def load_into(self, models: Sequence[nn.Module]) -> None:
        """Loads each model's best state (models without a finite value keep theirs)."""
        for model, state in zip(models, self.states, strict=True):
            if state is not None:
                model.load_state_dict(deepcopy(state))


def best_each(key: str, *, direction: Literal["min", "max"] = "min") -> BestModels:
    """A ``tap`` callback keeping each model's best state by ``event[key][k]`` (strict improvements)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    return BestModels(key, direction)
