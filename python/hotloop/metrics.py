"""Train and evaluation metrics: the built-in ones and how a ``metrics={key: name or function}`` argument
resolves (one rule for ``fit(metrics=...)`` and ``evaluate(metrics=...)``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

MetricFn = Callable[..., "torch.Tensor | float"]


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fraction of correct predictions, as a 0-dim float64 tensor on ``pred``'s device (no sync).

    - Several outputs per sample (``pred`` of shape ``(..., C)`` with ``C > 1``): the class is
      ``pred.argmax(-1)`` and ``labels`` holds class indices of shape ``pred.shape[:-1]``.
    - One output per sample (``pred`` of shape ``(N,)`` or ``(N, 1)``): ``pred`` is a logit and the
      class is ``1`` where ``pred > 0`` (as for ``BCEWithLogitsLoss``); ``labels`` holds ``0``/``1``
      (any dtype; nonzero counts as ``1``) with one label per sample.

    This is the metric named ``"accuracy"`` in :func:`evaluate`.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
        tensor(0.6667, dtype=torch.float64)
        >>> accuracy(torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])).item()
        0.75
    """
    if pred.dim() >= 2 and pred.shape[-1] > 1:
        if pred.shape[:-1] != labels.shape:
            raise ValueError(
                f"accuracy: labels of shape {tuple(labels.shape)} do not match predictions of shape "
                f"{tuple(pred.shape)}; expected class indices of shape {tuple(pred.shape[:-1])}"
            )
        hits = pred.argmax(dim=-1) == labels
    else:
        if pred.numel() != labels.numel():
            raise ValueError(
                f"accuracy: {labels.numel()} labels for {pred.numel()} single-output predictions "
                f"(shapes {tuple(labels.shape)} and {tuple(pred.shape)})"
            )
        hits = (pred.reshape(-1) > 0) == (labels.reshape(-1) != 0)
    # float64 keeps k/n exact enough that batched and full-batch accuracies print alike (mps has no float64)
    return hits.to(torch.float32 if hits.device.type == "mps" else torch.float64).mean()


METRICS: dict[str, MetricFn] = {"accuracy": accuracy}
"""The metrics :func:`evaluate` accepts by name."""


def resolve_metrics(metrics: Mapping[Any, Any], *, last_label: bool) -> dict[str, MetricFn]:
    """``{event_key: fn}`` from ``{event_key: built-in name or function}``; errors name the offending key."""
    resolved: dict[str, MetricFn] = {}
    for key, metric in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metrics keys must be str event keys (non-empty), got {key!r}")
        if isinstance(metric, str):
            if metric not in METRICS:
                known = ", ".join(repr(name) for name in METRICS)
                raise ValueError(f"metrics[{key!r}]: unknown metric name {metric!r}; known names: {known}")
            if not last_label:
                raise ValueError(
                    f"metrics[{key!r}]: {metric!r} compares predictions with labels, so it needs labels "
                    "(last_label=True); with last_label=False pass a function metric(pred) instead"
                )
            resolved[key] = METRICS[metric]
        elif callable(metric):
            resolved[key] = metric
        else:
            raise TypeError(
                f"metrics[{key!r}] must be callable or a metric name, got {type(metric).__name__}"
            )
    return resolved
