"""The python engine: the plain PyTorch training step, called by the native loop once per batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from .. import distributed
from .._native import _C
from .._shared import forward_and_loss
from ..clipping import stepped_params
from ..optim import requires_closure
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
    ``GradScaler``. With ``plan.accumulate > 1`` the batch holds that many micro-batches of
    ``plan.batch_size``, each backpropagating its loss divided by ``accumulate`` before the one optimizer
    step; the step's loss and metrics are their sample-weighted means. ``plan.grad_clip`` clips the
    optimizer's gradients after ``backward()`` (after ``GradScaler.unscale_``, inside an LBFGS closure),
    and a non-finite norm under ``error_if_nonfinite`` skips the step, reported as a NaN loss.

    An optimizer whose step requires a closure (torch.optim.LBFGS) is stepped as a plain loop steps it:
    ``optimizer.step(closure)``, the closure zeroing the gradients, running forward and loss on the batch,
    backpropagating and returning the loss. The step's loss and metrics are the closure's first
    evaluation's (the loss ``step`` returns), checked for ``guard_nonfinite`` before anything changes.
    """
    # Over 60 lines for a reason: the plain step and the closure step share their set-up and helpers.
    model, optimizer, loss_fn, last_label = plan.model, plan.optimizer, plan.loss_fn, plan.last_label
    metrics, scheduler, guard_nonfinite = plan.metric_fns, plan.step_scheduler, plan.guard_nonfinite
    clip, clipped, accumulate = plan.grad_clip, stepped_params(optimizer), plan.accumulate
    skipped = torch.tensor(float("nan"))  # the loss reported for a step whose gradient norm is not finite
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.amp) if plan.amp is not None else None
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type) if plan.amp == "fp16" else None
    with_closure = closure_step_required(optimizer)
    if with_closure and accumulate > 1:
        raise ValueError(
            f"accumulate={accumulate} cannot step {type(optimizer).__name__}, whose step takes a closure"
        )
    if with_closure and scaler is not None:
        raise ValueError(
            f"amp='fp16' cannot step {type(optimizer).__name__}: GradScaler does not take closures"
        )

    def forward(batch: Sequence[torch.Tensor]) -> tuple[Any, Any, torch.Tensor]:
        autocast = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            pred, labels, loss = forward_and_loss(model, loss_fn, batch, last_label)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        return pred, labels, loss

    def metric_values(pred: Any, labels: Any, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(_as_tensor(fn(pred, labels) if last_label else fn(pred), loss) for fn in metrics)

    data_parallel = plan.data_parallel

    def skip_loss(loss: torch.Tensor) -> torch.Tensor | None:
        """The loss to return without stepping, or None to step. Under a process group the decision is the
        ranks' (one all-reduce): a rank that skipped backward alone would leave the others waiting in DDP's
        all-reduce."""
        if not guard_nonfinite:
            return None
        if not math.isfinite(loss.item()):
            if data_parallel is not None:
                distributed.any_rank(data_parallel, True)
            return loss.detach()
        if data_parallel is not None and distributed.any_rank(data_parallel, False):
            return torch.full_like(loss.detach(), float("nan"))  # another rank's loss is not finite
        return None

    def step(*batch: torch.Tensor) -> Any:
        if accumulate > 1:
            return accumulated_step(batch)
        pred, labels, loss = forward(batch)
        bad = skip_loss(loss)
        if bad is not None:
            return bad
        # Metrics first: one that fails must fail before the update, not after it.
        values = metric_values(pred, labels, loss) if metrics else ()
        optimizer.zero_grad()
        backward(loss)
        return finish_step((loss.detach(), *values) if metrics else loss.detach())

    def backward(loss: torch.Tensor) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()

    def finish_step(result: Any) -> Any:
        """Clip, step and schedule after the gradients are in; a non-finite norm under error_if_nonfinite
        skips the step and reports a NaN loss."""
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)  # torch's recipe: clip the unscaled gradients
            if not clip.eager_(clipped):
                return skipped
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        return result

    def accumulated_step(batch: Sequence[torch.Tensor]) -> Any:
        # The plain loop of fit()'s docstring: zero_grad, then (loss / k).backward() per micro-batch.
        optimizer.zero_grad()
        count = batch[0].shape[0]
        loss_sum, value_sums = None, ()
        for micro in zip(*(t.split(plan.batch_size) for t in batch), strict=True):
            pred, labels, loss = forward(micro)
            if guard_nonfinite and not math.isfinite(loss.item()):
                return loss.detach()
            values = metric_values(pred, labels, loss) if metrics else ()
            backward(loss / accumulate)
            n = micro[0].shape[0]
            if loss_sum is None:
                loss_sum, value_sums = loss.detach() * n, tuple(v * n for v in values)
            else:
                loss_sum = loss_sum + loss.detach() * n
                value_sums = tuple(a + v * n for a, v in zip(value_sums, values, strict=True))
        mean = loss_sum / count
        return finish_step((mean, *(v / count for v in value_sums)) if metrics else mean)

    def closure_step(*batch: torch.Tensor) -> Any:
        # The plain loop's `optimizer.step(closure)`; the loss is the first evaluation's, as step returns it.
        first: list[tuple[torch.Tensor, ...]] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            pred, labels, loss = forward(batch)
            if not first:
                bad = skip_loss(loss)
                if bad is not None:
                    raise _NonFiniteLoss(bad)
                first.append(metric_values(pred, labels, loss) if metrics else ())
            loss.backward()
            if clip is not None and not clip.eager_(clipped):
                raise _NonFiniteLoss(skipped)
            return loss

        try:
            loss = optimizer.step(closure)
        except _NonFiniteLoss as skipped:
            return skipped.loss
        if scheduler is not None:
            scheduler.step()
        return (loss.detach(), *first[0]) if metrics else loss.detach()

    return closure_step if with_closure else step


class _NonFiniteLoss(Exception):
    """Leaves a closure optimizer's step before it changes anything: the batch's loss is not finite."""

    def __init__(self, loss: torch.Tensor) -> None:
        super().__init__("non-finite loss")
        self.loss = loss


def closure_step_required(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure: True for torch.optim.LBFGS, whose closure the python
    engine writes as a plain loop does; a ValueError for any other such optimizer, whose closure contract
    hotloop cannot know."""
    if not requires_closure(optimizer):
        return False
    if isinstance(optimizer, torch.optim.LBFGS):
        return True
    raise ValueError(
        f"{type(optimizer).__name__}.step requires a closure, and hotloop only calls closures for "
        "torch.optim.LBFGS (zero_grad, forward, loss, backward, return the loss), a contract it cannot "
        "assume for other optimizers"
    )


def _as_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=like.device)
