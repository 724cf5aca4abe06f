"""Stream stages for fit_many's events, whose ``model`` is a list of K models: per-model validation in one
stacked (vmap) pass (native via ``many_eval``), per-model early stopping that freezes each model alone, and
per-model best states."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from copy import deepcopy
from math import isfinite
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from . import _checks as check
from .fidelity import refusal_reason
from .many_eval import ManyEvaluation
from .metrics import resolve_metrics


def evaluate_many(
    val_data: Sequence[torch.Tensor],
    *,
    metrics: Mapping[str, str | Callable[..., Any]],
    subsets: Sequence[torch.Tensor] | None = None,
    last_label: bool = True,
    batch_size: int | None = None,
) -> Callable[[dict[str, Any]], dict[str, list[float]]]:
    """An ``augment`` callback for :func:`fit_many` streams adding, per metric key, a list with each model's
    value on ``val_data`` (or on its own ``val_data[subsets[k]]``, e.g. :func:`kfold`'s held-out folds).

    All K models are scored in one stacked ``vmap`` pass per batch, without gradients, in eval mode (modes
    restored afterwards): natively (captured once, run by the C++ evaluator) when the forward and metrics can
    be captured, else eagerly with a SlowPathWarning saying why; all metrics share the forward. A metric
    is a function ``(pred, labels)`` (``(pred)`` without labels) returning a batch mean, or a built-in name
    (``"accuracy"``). With ``batch_size`` each model's value is the sample-weighted mean over its batches;
    without, one batch per model. Models that cannot be stacked (hooks, differing architectures) are scored
    one after another.
    """
    tensors = check.check_tensors("val_data", val_data, last_label=last_label)
    resolved = resolve_metrics(dict(metrics), last_label=last_label)
    if not resolved:
        raise ValueError("metrics must contain at least one metric.")
    n = tensors[0].shape[0]
    if batch_size is not None:
        check.check_int("batch_size", batch_size, minimum=1)
    index_sets = None
    if subsets is not None:
        index_sets = [torch.as_tensor(s, dtype=torch.int64) for s in subsets]
        for k, s in enumerate(index_sets):
            if s.dim() != 1 or s.numel() == 0 or int(s.min()) < 0 or int(s.max()) >= n:
                raise ValueError(f"subsets[{k}] must be a non-empty 1-D index tensor into val_data")

    natives: dict[int, ManyEvaluation] = {}  # per K

    def compute(event: dict[str, Any]) -> dict[str, list[float]]:
        models = list(event["model"])
        K = len(models)
        if index_sets is not None and len(index_sets) != K:
            raise ValueError(f"evaluate_many has {len(index_sets)} subsets for {K} models")
        if K not in natives:
            sets = index_sets if index_sets is not None else [torch.arange(n)] * K
            common = min(len(s) for s in sets)
            natives[K] = ManyEvaluation(
                tensors,
                resolved,
                index_sets=[s.to(tensors[0].device) for s in index_sets] if index_sets is not None else None,
                common=common,
                last_label=last_label,
                batch_size=batch_size or common,
            )
        modes = [(m, m.training) for model in models for m in model.modules()]
        try:
            for model in models:
                model.eval()
            with torch.no_grad():
                return _scores(models, tensors, resolved, index_sets, last_label, batch_size, natives[K])
        finally:
            for module, training in modes:
                module.training = training

    return compute


def validation_loss_many(
    val_data: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    subsets: Sequence[torch.Tensor] | None = None,
    key: str = "val_loss",
    last_label: bool = True,
    batch_size: int | None = None,
) -> Callable[[dict[str, Any]], dict[str, list[float]]]:
    """:func:`evaluate_many` with one metric, ``loss_fn`` (a batch mean), under ``key``."""
    check.check_callable("loss_fn", loss_fn)
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    return evaluate_many(
        val_data, metrics={key: loss_fn}, subsets=subsets, last_label=last_label, batch_size=batch_size
    )


def _scores(
    models: list[nn.Module],
    tensors: list[torch.Tensor],
    metrics: Mapping[str, Callable[..., Any]],
    index_sets: list[torch.Tensor] | None,
    last_label: bool,
    batch_size: int | None,
    native: ManyEvaluation | None = None,
) -> dict[str, list[float]]:
    K, n = len(models), tensors[0].shape[0]
    device = tensors[0].device
    sets = (
        [s.to(device) for s in index_sets] if index_sets is not None else [torch.arange(n, device=device)] * K
    )
    fns = list(metrics.values())
    stackable = (
        all(refusal_reason(m) is None for m in models)
        and len({tuple((k, v.shape, v.dtype) for k, v in m.state_dict().items()) for m in models}) == 1
        and len({tuple(type(m) for m in model.modules()) for model in models}) == 1
    )
    totals = torch.zeros(len(fns), K, dtype=torch.float64)

    def values_of(pred: Any, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        out = [torch.as_tensor(fn(pred, batch[-1]) if last_label else fn(pred)) for fn in fns]
        return torch.stack([v.reshape(()).to(torch.float64) for v in out])

    common = min(len(s) for s in sets) if stackable else 0
    native_totals = native(models) if common and native is not None else None
    if native_totals is not None:
        totals += native_totals
    elif native is not None:
        # not captured: model by model (what stops the capture, such as .item() in a metric, stops vmap too)
        common = 0
    if common and native_totals is None:
        params, buffers = stack_module_state(models)
        base = models[0]

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *batch: torch.Tensor) -> torch.Tensor:
            inputs = batch[:-1] if last_label else batch
            return values_of(functional_call(base, (p, b), tuple(inputs)), batch)

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
            totals += run(params, buffers, *batch).T.cpu() * size
    for k, model in enumerate(models):
        rest = sets[k][common:]
        step = batch_size or max(len(rest), 1)
        for start in range(0, len(rest), step):
            idx = rest[start : start + step]
            batch = [t[idx] for t in tensors]
            inputs = batch[:-1] if last_label else batch
            totals[:, k] += values_of(model(*inputs), batch).cpu() * len(idx)
    sizes = torch.tensor([len(s) for s in sets], dtype=torch.float64)
    means = totals / sizes
    return {key: means[i].tolist() for i, key in enumerate(metrics)}


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
