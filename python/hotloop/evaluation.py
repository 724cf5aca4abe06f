"""Evaluation during training: metrics on held-out tensors (full or mini-batch) and the best model state.

``evaluate``/``validation_loss`` return ``augment`` callbacks and ``best_model`` a ``tap`` callback, as in
fitstream 0.4.1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from math import isfinite
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import _checks as check
from .metrics import MetricFn, resolve_metrics
from .native_eval import NativeEvaluation


def _check_val_data(val_data: Any, last_label: bool) -> list[torch.Tensor]:
    if isinstance(val_data, torch.Tensor):
        raise TypeError("val_data must be a tuple or list of tensors, got a single Tensor; pass e.g. (X, y)")
    if not isinstance(val_data, Sequence) or isinstance(val_data, (str, bytes)):
        raise TypeError(f"val_data must be a tuple or list of tensors, got {type(val_data).__name__}")
    if not val_data:
        raise ValueError("val_data must contain at least one tensor.")
    if last_label and len(val_data) < 2:
        raise ValueError("last_label=True requires at least two tensors (inputs and labels).")
    for index, tensor in enumerate(val_data):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"val_data[{index}] must be a torch.Tensor, got {type(tensor).__name__}")
    return list(val_data)


def _check_batch_size(batch_size: Any, tensors: list[torch.Tensor]) -> None:
    if batch_size is None:
        return
    check.check_int("batch_size", batch_size, minimum=1)
    for index, tensor in enumerate(tensors):
        if tensor.dim() == 0:
            raise ValueError(f"val_data[{index}] needs a sample (first) dimension to be batched")
        if tensor.shape[0] != tensors[0].shape[0]:
            raise ValueError(
                f"val_data tensors must have the same number of samples to be batched: val_data[0] has "
                f"{tensors[0].shape[0]}, val_data[{index}] has {tensor.shape[0]}"
            )


def _as_float(value: torch.Tensor | float) -> float:
    return float(value.detach().item() if isinstance(value, torch.Tensor) else value)


def evaluate_batched(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor | None,
    metrics: Mapping[str, MetricFn],
    batch_size: int,
) -> dict[str, float]:
    """Sample-weighted means of ``metrics`` over consecutive batches of ``inputs`` (and ``labels``).

    Each metric is called once per batch as ``metric(pred, labels)`` (``metric(pred)`` when ``labels`` is
    ``None``) and must return that batch's mean as a single-element tensor or a number. Tensor values are
    accumulated on their device (float64 where the device has it) and synchronised once per metric at the
    end. Runs without gradients; the caller sets the model's mode. This is the Python fallback of the
    native evaluator (:mod:`hotloop.native_eval`), which keeps the same contract.

    Example:
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = nn.init.ones_(model.weight)
        >>> x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [2.0], [5.0]])
        >>> evaluate_batched(model, [x], y, {"mse": nn.MSELoss()}, batch_size=2)
        {'mse': 1.3333333333333333}
    """
    count = inputs[0].shape[0]
    totals: dict[str, torch.Tensor | float] = {}
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = [tensor[start : start + batch_size] for tensor in inputs]
            size = batch[0].shape[0]
            pred = model(*batch)
            targets = None if labels is None else labels[start : start + batch_size]
            for key, metric in metrics.items():
                value = metric(pred) if targets is None else metric(pred, targets)
                if isinstance(value, torch.Tensor):
                    if value.numel() != 1:
                        raise ValueError(
                            f"metric {key!r} must return a single-element tensor or a number per batch, "
                            f"got a tensor of shape {tuple(value.shape)}"
                        )
                    wide = torch.float32 if value.device.type == "mps" else torch.float64
                    weighted: torch.Tensor | float = value.detach().reshape(()).to(wide) * size
                else:
                    weighted = float(value) * size
                totals[key] = weighted if key not in totals else totals[key] + weighted
    return {key: _as_float(total / count) for key, total in totals.items()}


def evaluate(
    val_data: Sequence[torch.Tensor],
    *,
    metrics: Mapping[str, MetricFn | str],
    last_label: bool = True,
    batch_size: int | None = None,
) -> Callable[[dict[str, Any]], dict[str, float]]:
    """An ``augment`` callback that adds ``metrics`` of ``event["model"]`` on ``val_data``, as floats.

    Args:
        val_data: Tensors with the samples first, on the model's device. With ``last_label=True`` the
            last one holds the labels and the others are the model's inputs.
        metrics: Event key -> metric. A metric is a function ``(pred, labels)`` (``(pred)`` when
            ``last_label=False``) returning a single-element tensor or a number, or the name
            ``"accuracy"`` (see :func:`accuracy`). All metrics share one forward pass.
        last_label: Whether the last tensor of ``val_data`` holds the labels.
        batch_size: ``None`` (the default, as in fitstream) runs one forward pass over all of
            ``val_data`` and gives each metric the full predictions. An ``int`` runs batches of that
            many samples (the last may be smaller) and reports each metric's sample-weighted mean over
            the batches, so metrics must be means over the samples (as ``nn.MSELoss()`` or
            ``"accuracy"`` are); values stay on the device until one sync per metric.
            Batched evaluation runs natively: at the first event the forward and the metrics are
            captured as ATen graphs (one per batch size; the model's forward and each metric run a
            few times then) and C++ runs the batches with no Python per batch. Metrics that return
            numbers, read tensor values in Python or cannot be traced run in Python batch by batch,
            with a :class:`~hotloop.SlowPathWarning` saying why. The graphs are captured again when
            the model's modules or its parameter/buffer names, shapes, dtypes or devices change.

    The model runs in eval mode without gradients; every module's previous mode is restored afterwards,
    also when a metric raises. Metrics must not modify the predictions or labels.

    Example:
        >>> from hotloop import augment, pipe
        >>> model = nn.Linear(2, 2)
        >>> x, y = torch.randn(10, 2), torch.randint(0, 2, (10,))
        >>> stage = augment(evaluate((x, y), metrics={"val_acc": "accuracy"}, batch_size=4))
        >>> event = next(iter(pipe([{"step": 1, "model": model}], stage)))
        >>> 0.0 <= event["val_acc"] <= 1.0, model.training
        (True, True)
    """
    check.check_bool("last_label", last_label)
    tensors = _check_val_data(val_data, last_label)
    if isinstance(metrics, (str, bytes)):
        raise TypeError("metrics must be a mapping from event keys to metrics, got str")
    try:
        named = dict(metrics)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"metrics must be a mapping from event keys to metrics, got {type(metrics).__name__}"
        ) from error
    if not named:
        raise ValueError("metrics must contain at least one metric.")
    resolved = resolve_metrics(named, last_label=last_label)
    _check_batch_size(batch_size, tensors)
    inputs = tensors[:-1] if last_label else tensors
    labels = tensors[-1] if last_label else None
    native = None
    if batch_size is not None:
        native = NativeEvaluation(tensors, resolved, last_label=last_label, batch_size=batch_size)

    def compute(event: dict[str, Any]) -> dict[str, float]:
        model = event["model"]
        if not isinstance(model, nn.Module):
            raise TypeError("evaluate expects an event containing a 'model' key with a torch.nn.Module.")
        modes = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            if native is not None:
                values = native(model)
                if values is not None:
                    return values
                return evaluate_batched(model, inputs, labels, resolved, batch_size)
            with torch.no_grad():
                pred = model(*inputs)
                return {
                    key: _as_float(metric(pred) if labels is None else metric(pred, labels))
                    for key, metric in resolved.items()
                }
        finally:
            for module, training in modes:
                module.training = training

    return compute


def validation_loss(
    val_data: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    key: str = "val_loss",
    last_label: bool = True,
    batch_size: int | None = None,
) -> Callable[[dict[str, Any]], dict[str, float]]:
    """An ``augment`` callback that adds ``loss_fn`` on ``val_data`` under ``key``: :func:`evaluate` with
    one metric.

    ``loss_fn`` is called as ``loss_fn(pred, labels)`` (``loss_fn(pred)`` when ``last_label=False``).
    With ``batch_size`` the loss must be a mean over the batch (the default ``reduction="mean"``).

    Example:
        >>> from hotloop import augment
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = nn.init.zeros_(model.weight)
        >>> val = (torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [3.0]]))
        >>> list(augment(validation_loss(val, nn.MSELoss()))([{"step": 1, "model": model}]))[0]["val_loss"]
        5.0
    """
    check.check_callable("loss_fn", loss_fn)
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    return evaluate(val_data, metrics={key: loss_fn}, last_label=last_label, batch_size=batch_size)


def _snapshot(model: nn.Module, device: str | torch.device | None) -> dict[str, Any]:
    """A copy of ``model.state_dict()`` that later training cannot change; tensors go to ``device``."""
    state = model.state_dict()
    copies: dict[int, Any] = {}
    for value in state.values():
        if isinstance(value, torch.Tensor) and id(value) not in copies:
            copies[id(value)] = value.detach().to(device=device, copy=True)
    return deepcopy(state, copies)


class BestModel:
    """The ``tap`` callback returned by :func:`best_model`: keeps the state of the best model seen so far."""

    def __init__(
        self,
        metric_key: str,
        direction: Literal["min", "max"],
        device: str | torch.device | None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(metric_key, str):
            raise TypeError(f"metric_key must be a str, got {type(metric_key).__name__}")
        if direction not in {"min", "max"}:
            raise ValueError("direction must be one of {'min', 'max'}.")
        if device is not None:
            if not isinstance(device, (str, torch.device)):
                raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")
            try:
                torch.device(device)
            except RuntimeError as error:
                raise ValueError(f"device {device!r} is not a valid torch device: {error}") from error
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str, os.PathLike or None, got {type(path).__name__}")
        self._metric_key = metric_key
        self._direction = direction
        self._device = device
        self._path = None if path is None else Path(path)
        self._best: float | None = None
        self._state: dict[str, Any] | None = None

    @property
    def best(self) -> float | None:
        """The best metric value seen so far (``None`` before the first event)."""
        return self._best

    def __call__(self, event: dict[str, Any]) -> None:
        """Look at ``event[metric_key]`` and snapshot ``event["model"]`` if it strictly improved.

        Raises ``ValueError`` when the metric is not finite.
        """
        value = float(event[self._metric_key])
        if not isfinite(value):
            raise ValueError(f"Metric {self._metric_key!r} must be finite.")
        if self._best is not None and (
            value >= self._best if self._direction == "min" else value <= self._best
        ):
            return
        model = event["model"]
        if not isinstance(model, nn.Module):
            raise TypeError("best_model expects an event containing a 'model' key with a torch.nn.Module.")
        self._state = _snapshot(model, self._device)
        self._best = value
        if self._path is not None:
            # write then rename, so the file at path is always a whole checkpoint
            partial = self._path.with_name(self._path.name + ".partial")
            torch.save(self._state, partial)
            os.replace(partial, self._path)

    def load_into(self, model: nn.Module) -> None:
        """Load the best state into ``model`` (same architecture) with ``load_state_dict``.

        The model keeps its parameter objects, devices, dtypes and train/eval mode; optimizer state is
        not part of the snapshot. Raises ``RuntimeError`` before any snapshot, or when the state does not
        fit ``model``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self._state is None:
            raise RuntimeError("No model state has been captured yet.")
        model.load_state_dict(deepcopy(self._state))


def best_model(
    metric_key: str,
    *,
    direction: Literal["min", "max"] = "min",
    device: str | torch.device | None = None,
    path: str | os.PathLike[str] | None = None,
) -> BestModel:
    """A ``tap`` callback that keeps a copy of the model state with the best ``event[metric_key]``.

    Args:
        metric_key: Event key of a finite metric (anything ``float()`` accepts).
        direction: ``"min"`` (lower is better) or ``"max"``.
        device: Where the snapshot's tensors are kept: ``None`` keeps each tensor's device, ``"cpu"``
            copies straight to host memory. Dtypes are kept.
        path: Also ``torch.save`` the snapshot (a state dict) to this file on every improvement,
            replacing it atomically; load it with ``model.load_state_dict(torch.load(path))``.

    Only strict improvements replace the snapshot (ties keep the earlier one), and only events that
    reach the callback count: put ``tap(best)`` after the stage computing the metric. After the stream,
    ``best.load_into(model)`` restores the weights (not the optimizer). Use one tracker per run.

    Example:
        >>> from hotloop import pipe, tap
        >>> model = nn.Linear(1, 1)
        >>> best = best_model("val_loss")
        >>> for value in [3.0, 1.0, 2.0]:
        ...     _ = nn.init.constant_(model.weight, value)
        ...     _ = list(pipe([{"model": model, "val_loss": value}], tap(best)))
        >>> best.best, best.load_into(model), model.weight.item()
        (1.0, None, 1.0)
    """
    return BestModel(metric_key, direction, device, path)
