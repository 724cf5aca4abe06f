"""Engine choice and the Python side of each engine (the python fallback step lives here)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._native import _C

ENGINES = ("auto", "graph", "native", "python")


class SlowPathWarning(UserWarning):
    """hotloop is running the python engine (one Python call per batch) instead of a native one."""


@dataclass
class EngineChoice:
    name: str
    step: Any  # a _C.Step
    reason: str | None = None  # why a faster engine was not used


def python_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    last_label: bool,
) -> Callable[..., torch.Tensor]:
    """The plain PyTorch training step, called once per batch by the native loop."""

    def step(*batch: torch.Tensor) -> torch.Tensor:
        if last_label:
            *inputs, labels = batch
            loss = loss_fn(model(*inputs), labels)
        else:
            loss = loss_fn(model(*batch))
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def choose_engine(
    requested: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    last_label: bool,
) -> EngineChoice:
    reason: str | None = None
    if requested in ("graph", "native"):
        raise NotImplementedError(f"engine={requested!r} is not available in this build yet")
    if requested == "auto":
        reason = "the native engine is not available in this build yet"
    choice = EngineChoice("python", _C.PythonStep(python_step(model, optimizer, loss_fn, last_label)), reason)
    if choice.reason is not None:
        warnings.warn(f"hotloop is using the python engine: {choice.reason}", SlowPathWarning, stacklevel=4)
    return choice
