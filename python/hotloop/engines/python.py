"""The python engine: the plain PyTorch training step, called by the native loop once per batch."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from .._native import _C
from .._shared import forward_and_loss
from ..plan import Plan
from .base import EngineRun


class PythonEngine:
    """Always runs: the data path stays native, the step is Python (the slow path, and says so)."""

    name = "python"
    auto_devices = ("cpu", "cuda", "mps")

    def refuse(self, plan: Plan) -> str | None:
        return None

    def build(self, plan: Plan) -> EngineRun:
        return EngineRun(self.name, _C.PythonStep(python_step(plan)))


def python_step(plan: Plan) -> Any:
    """The plain PyTorch training step for ``plan``, called once per batch by the native loop.

    Returns the detached loss, or ``(loss, *metric_means)`` when train metrics are asked for. With
    ``plan.guard_nonfinite`` a batch whose loss is not finite is not applied (the Loop then ends the
    window); a per-step scheduler is stepped after every optimizer step, as in a plain per-step schedule.
    ``plan.amp`` (``"bf16"``/``"fp16"``) runs forward and loss under ``torch.autocast``, fp16 with a
    ``GradScaler``.
    """
    model, optimizer, loss_fn, last_label = plan.model, plan.optimizer, plan.loss_fn, plan.last_label
    metrics, scheduler, guard_nonfinite = plan.metric_fns, plan.step_scheduler, plan.guard_nonfinite
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.amp) if plan.amp is not None else None
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type) if plan.amp == "fp16" else None

    def step(*batch: torch.Tensor) -> Any:
        autocast = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            pred, labels, loss = forward_and_loss(model, loss_fn, batch, last_label)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if guard_nonfinite and not math.isfinite(loss.item()):
            return loss.detach()
        # Metrics first: one that fails must fail before the update, not after it.
        values: tuple[torch.Tensor, ...] = ()
        if metrics:
            with torch.no_grad():
                values = tuple(
                    _as_tensor(fn(pred, labels) if last_label else fn(pred), loss) for fn in metrics
                )
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        return (loss.detach(), *values) if metrics else loss.detach()

    return step


def _as_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=like.device)
