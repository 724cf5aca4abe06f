"""Engine choice and the Python side of each engine (the python fallback step lives here)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._native import _C

ENGINES = ("auto", "graph", "native", "python")


class SlowPathWarning(UserWarning):
    """hotloop is running a slower engine than ``engine="auto"`` looks for first: the python engine (one
    Python call per batch) instead of a native one, or on CUDA the native engine instead of the graph one."""


@dataclass
class EngineChoice:
    name: str
    step: Any  # a _C.HostStep (python) or _C.DeviceStep (native, graph)
    reason: str | None = None  # why a faster engine was not used
    # before each Loop.run, with the number of steps the window will take unless it stops early (reads
    # lr etc. afresh); and after it, even when it raised
    begin_window: Callable[[int], None] | None = None
    end_window: Callable[[], None] | None = None
    reuse_buffers: bool = False  # the step never keeps a batch past its run: the Dataset may reuse them


def python_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    last_label: bool,
    *,
    metrics: Sequence[Callable[..., Any]] = (),
    scheduler: Any | None = None,
    guard_nonfinite: bool = False,
    amp: str | None = None,
) -> Callable[..., Any]:
    """The plain PyTorch training step, called once per batch by the native loop.

    Returns the detached loss, or ``(loss, *metric_means)`` when train metrics are asked for. With
    ``guard_nonfinite`` a batch whose loss is not finite is not applied (the Loop then ends the window);
    ``scheduler`` is stepped after every optimizer step, as in a plain per-step schedule. ``amp``
    (``"bf16"``/``"fp16"``) runs forward and loss under ``torch.autocast``, fp16 with a ``GradScaler``.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if amp is not None else None
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None

    def step(*batch: torch.Tensor) -> Any:
        autocast = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            if last_label:
                *inputs, labels = batch
                pred = model(*inputs)
                loss = loss_fn(pred, labels)
            else:
                labels = None
                pred = model(*batch)
                loss = loss_fn(pred)
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


def choose_engine(
    requested: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    last_label: bool,
    train_data: Sequence[torch.Tensor],
    batch_size: int,
    drop_last: bool = False,
    shuffle: bool = True,
    metrics: Sequence[Callable[..., Any]] = (),
    scheduler: Any | None = None,
    guard_nonfinite: bool = False,
    amp: str | None = None,
) -> EngineChoice:
    """The fastest engine that can run this step (``requested="auto"``), or the one asked for.

    ``scheduler`` is a learning-rate scheduler to step after every optimizer step (None: none per step).
    """
    reason: str | None = None
    graph_reason: str | None = None
    on_cuda = train_data[0].device.type == "cuda"
    if requested == "graph" or (requested == "auto" and on_cuda):
        from .graph import graph_engine

        graph, reason = graph_engine(
            model,
            optimizer,
            loss_fn,
            last_label=last_label,
            train_data=train_data,
            batch_size=batch_size,
            drop_last=drop_last,
            metrics=metrics,
            scheduler=scheduler,
            guard_nonfinite=guard_nonfinite,
            amp=amp,
        )
        if graph is not None:
            return graph
        if requested == "graph":
            raise RuntimeError(f"engine='graph' cannot run this training step: {reason}")
        graph_reason = f"the graph engine cannot run this training step: {reason}"
    if requested in ("auto", "native"):
        if amp is not None:
            reason = "it does not run mixed precision (amp)"
        else:
            native, reason = native_engine(
                model,
                optimizer,
                loss_fn,
                last_label=last_label,
                train_data=train_data,
                batch_size=batch_size,
                drop_last=drop_last,
                shuffle=shuffle,
                metrics=metrics,
                scheduler=scheduler,
            )
            if native is not None:
                if graph_reason is not None:
                    message = f"hotloop is using the native engine: {graph_reason}"
                    warnings.warn(message, SlowPathWarning, stacklevel=4)
                return native
        if requested == "native":
            raise RuntimeError(f"engine='native' cannot run this training step: {reason}")
        reason = f"the native engine cannot run this training step: {reason}"
        if graph_reason is not None:
            reason = f"{graph_reason}; {reason}"
    step = python_step(
        model,
        optimizer,
        loss_fn,
        last_label,
        metrics=metrics,
        scheduler=scheduler,
        guard_nonfinite=guard_nonfinite,
        amp=amp,
    )
    choice = EngineChoice("python", _C.PythonStep(step), reason)
    if choice.reason is not None:
        warnings.warn(f"hotloop is using the python engine: {choice.reason}", SlowPathWarning, stacklevel=4)
    return choice


def example_batches(
    train_data: Sequence[torch.Tensor], batch_size: int, drop_last: bool, shuffle: bool = True
) -> list[list[torch.Tensor]]:
    """A real batch of each size an epoch visits (the full batch and, unless dropped, the smaller last one),
    laid out as the Dataset lays out its batches: gathered rows of contiguous tensors when shuffling,
    slices of the tensors themselves when not."""
    n = train_data[0].shape[0]
    sizes = [min(batch_size, n)]
    if n > batch_size and n % batch_size and not drop_last:
        sizes.append(n % batch_size)
    sources = [t.contiguous() for t in train_data] if shuffle else list(train_data)
    return [[t[:size] for t in sources] for size in sizes]


def native_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    last_label: bool,
    train_data: Sequence[torch.Tensor],
    batch_size: int,
    drop_last: bool,
    shuffle: bool = True,
    metrics: Sequence[Callable[..., Any]] = (),
    scheduler: Any | None = None,
) -> tuple[EngineChoice | None, str | None]:
    """The native engine for this step, or ``(None, reason)``: the optimizer or the capture error.

    A per-step ``scheduler`` is run ahead through each window (``optim.schedule_window``) and the native
    optimizer takes its learning rates (and momenta) step by step."""
    from . import capture, optim

    handle, reason = optim.native_optimizer(optimizer)
    if handle is None:
        return None, reason
    try:
        captured = capture.capture_step(
            model,
            loss_fn,
            example_batches(train_data, batch_size, drop_last, shuffle),
            last_label=last_label,
            metrics=metrics,
        )
    except capture.CaptureError as exc:
        return None, str(exc)

    def not_stepped() -> list[bool]:
        # a plain loop's zero_grad() never reaches these, so their .grad sums over steps
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [id(p) not in stepped for p in captured.params]

    step = _C.NativeStep(
        captured.params,
        captured.state,
        list(captured.graphs.items()),
        [list(t.shape[1:]) for t in train_data],
        not_stepped(),
        handle,
    )

    settle: list[Callable[[int], None]] = []

    def begin_window(planned_steps: int) -> None:
        if captured.refresh(model):
            step.bind(captured.params, captured.state)
        step.set_accumulate(not_stepped())  # param groups may have been added
        schedule: dict[str, Any] = {}
        if scheduler is not None:
            schedule, rewind = optim.schedule_window(scheduler, planned_steps)
            settle.append(rewind)
        optim.configure_window(handle, optimizer, captured.params, **schedule)

    def end_window() -> None:
        taken = handle.steps_in_window
        optim.finish_window(handle, optimizer)
        while settle:
            settle.pop()(taken)

    choice = EngineChoice("native", step, begin_window=begin_window, end_window=end_window)
    choice.reuse_buffers = True  # NativeStep keeps no batch past its run
    return choice, None
