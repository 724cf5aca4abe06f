"""The vocabulary every layer shares: warning and error types, batch sizes, the model's tensors, one eager
forward+loss, and the registry of running windows. Imports nothing of hotloop's, so no layer reaches up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class SlowPathWarning(UserWarning):
    """hotloop is running a slower engine than ``engine="auto"`` looks for first: the python engine (one
    Python call per batch) instead of a native one, or on CUDA the native engine instead of the graph one."""


class CaptureError(RuntimeError):
    """The model and loss cannot be captured as one static graph; the message says why."""


def batch_sizes(num_samples: int, batch_size: int, drop_last: bool = False) -> list[int]:
    """The batch sizes a pass over ``num_samples`` visits: the full batch and, unless dropped, the smaller
    last one.

    >>> batch_sizes(10, 4), batch_sizes(10, 4, drop_last=True), batch_sizes(3, 4)
    ([4, 2], [4], [3])
    """
    sizes = [min(batch_size, num_samples)]
    if num_samples > batch_size and num_samples % batch_size and not drop_last:
        sizes.append(num_samples % batch_size)
    return sizes


def example_batches(
    train_data: Sequence[torch.Tensor], batch_size: int, drop_last: bool, shuffle: bool = True
) -> list[list[torch.Tensor]]:
    """A real batch of each size an epoch visits, laid out as the native Dataset lays out its batches:
    gathered rows of contiguous tensors when shuffling, slices of the tensors themselves when not."""
    sources = [t.contiguous() for t in train_data] if shuffle else list(train_data)
    sizes = batch_sizes(train_data[0].shape[0], batch_size, drop_last)
    return [[t[:size] for t in sources] for size in sizes]


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters, then its buffers (tied ones once), with their names."""
    return [*model.named_parameters(), *model.named_buffers()]


def forward_and_loss(
    model: Callable[..., Any],
    loss_fn: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
    last_label: bool,
) -> tuple[Any, torch.Tensor | None, Any]:
    """One plain forward and loss on ``batch``: ``(pred, labels, loss)`` (labels None without last_label)."""
    if last_label:
        *inputs, labels = batch
        pred = model(*inputs)
        return pred, labels, loss_fn(pred, labels)
    pred = model(*batch)
    return pred, None, loss_fn(pred)


def traced_scalar_loss(loss: Any) -> torch.Tensor:
    """The loss a traced step differentiates, as a 0-dim tensor; a CaptureError when ``loss_fn`` returned
    something else."""
    if not isinstance(loss, torch.Tensor):
        raise CaptureError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise CaptureError(f"loss_fn must return a single value, got shape {tuple(loss.shape)}")
    return loss.reshape(())


# The training windows running now, innermost last: (loop, its total_steps at the window's start, planned).
_RUNNING: list[tuple[Any, int, int]] = []


def running_window() -> tuple[int, int] | None:
    """``(steps done, steps planned)`` of the training window running now, or ``None``.

    Windows run with the GIL released, so another thread (a progress bar) can poll this while the
    thread that called ``next()`` waits for the event.
    """
    if not _RUNNING:
        return None
    loop, start, planned = _RUNNING[-1]
    return loop.total_steps - start, planned


def enter_window(loop: Any, planned: int) -> tuple[Any, int, int]:
    entry = (loop, loop.total_steps, planned)
    _RUNNING.append(entry)
    return entry


def leave_window(entry: tuple[Any, int, int]) -> None:
    _RUNNING.remove(entry)  # its own entry: another thread's window may have started since
