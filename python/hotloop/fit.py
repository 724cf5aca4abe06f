"""fit(): fitstream's epoch_stream with a native inner loop. Validates lazily, then yields one Event per window."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import validation as check
from ._native import _C
from .engines import ENGINES, choose_engine
from .events import Event


class FitStream(Iterator[Event]):
    """The infinite event stream returned by :func:`fit`. Iterate it; ``close()`` frees the native state."""

    def __init__(self, run: Iterator[Event]) -> None:
        self._run = run

    def __iter__(self) -> FitStream:
        return self

    def __next__(self) -> Event:
        return next(self._run)

    def close(self) -> None:
        """Stop training and free the native loop, its dataset copy and buffers."""
        self._run.close()


def fit(
    train_data: Sequence[torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int = 1,
    shuffle: bool = True,
    last_label: bool = True,
    generator: torch.Generator | None = None,
    extra: Mapping[str, Any] | None = None,
    step_offset: int = 0,
    every: int | None = None,
    drop_last: bool = False,
    engine: str = "auto",
    device: str | torch.device | None = None,
) -> FitStream:
    """Train ``model`` on in-memory tensors, yielding an :class:`Event` per epoch (or every ``every`` steps).

    A drop-in for ``fitstream.epoch_stream``: same arguments, same event keys (``model``, ``step``,
    ``train_loss``, ``train_time_sec`` and the keys of ``extra``), same batches, same results. The
    batches are gathered and the steps run in C++; Python runs once per event.

    Args:
        train_data: Tensors sharing their first (sample) dimension. With ``last_label=True`` the last
            one holds the labels and the others are the model's inputs.
        model: The module to train; it stays the truth (its parameters hold the trained values at
            every event).
        optimizer: A ``torch.optim.Optimizer`` over ``model``'s parameters.
        loss_fn: Called as ``loss_fn(pred, labels)``, or ``loss_fn(pred)`` when ``last_label=False``;
            must return the batch's mean loss.
        batch_size: Samples per optimizer step; the last batch of an epoch may be smaller.
        shuffle: Visit samples in ``torch.randperm(n, generator=generator)`` order each epoch.
        last_label: Whether the last tensor of ``train_data`` holds the labels.
        generator: ``torch.Generator`` for the shuffle (the default generator when ``None``).
        extra: Keys added to every event.
        step_offset: Added to the 1-based event index reported as ``step``.
        every: Yield every ``every`` optimizer steps (windows may cross epoch ends) instead of per epoch.
        drop_last: Skip the smaller last batch of each epoch.
        engine: ``"auto"`` (fastest that works), ``"graph"``, ``"native"`` or ``"python"``.
        device: Copy ``train_data`` to this device once before training (it must be the model's).

    Events also carry ``epoch`` (epochs completed), ``updates`` (optimizer steps so far),
    ``samples_per_sec`` and ``engine``. Nothing runs, and bad arguments are not reported, until the
    first ``next()``.

    Example:
        >>> x = torch.tensor([[1.0], [2.0]])
        >>> y = torch.tensor([[1.0], [2.0]])
        >>> model = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        >>> stream = fit((x, y), model, optimizer, nn.MSELoss(), batch_size=2, shuffle=False, engine="python")
        >>> event = next(stream)
        >>> event["step"], event["train_loss"], event["updates"]
        (1, 2.5, 1)
    """
    return FitStream(
        _run(
            train_data, model, optimizer, loss_fn, batch_size=batch_size, shuffle=shuffle,
            last_label=last_label, generator=generator, extra=extra, step_offset=step_offset,
            every=every, drop_last=drop_last, engine=engine, device=device,
        )
    )


epoch_stream = fit


def _run(
    train_data: Sequence[torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int,
    shuffle: bool,
    last_label: bool,
    generator: torch.Generator | None,
    extra: Mapping[str, Any] | None,
    step_offset: int,
    every: int | None,
    drop_last: bool,
    engine: str,
    device: str | torch.device | None,
) -> Iterator[Event]:
    check.check_int("batch_size", batch_size, minimum=1)
    check.check_bool("shuffle", shuffle)
    check.check_bool("last_label", last_label)
    check.check_bool("drop_last", drop_last)
    check.check_int("step_offset", step_offset)
    if every is not None:
        check.check_int("every", every, minimum=1)
    check.check_choice("engine", engine, ENGINES)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    check.check_optimizer(optimizer, model)
    check.check_callable("loss_fn", loss_fn)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    tensors = check.check_tensors("train_data", train_data, last_label=last_label)
    target = check.model_device(model)
    if device is not None:
        wanted = torch.device(device)
        if wanted.type != target.type or (wanted.index is not None and wanted != target):
            raise ValueError(f"device={wanted} differs from the model's device {target}; move the model first")
        tensors = [t.to(target) for t in tensors]
    if tensors[0].device != target:
        raise ValueError(
            f"train_data is on {tensors[0].device} but the model is on {target}; move the data "
            f"(or pass device={str(target)!r} to copy it once)"
        )
    if generator is not None and generator.device.type != target.type:
        raise ValueError(f"generator is on {generator.device} but train_data is on {target}")
    if drop_last and batch_size > tensors[0].shape[0]:
        raise ValueError(
            f"drop_last=True with batch_size={batch_size} larger than the {tensors[0].shape[0]} samples "
            "would leave no batch"
        )

    choice = choose_engine(engine, model, optimizer, loss_fn, last_label=last_label)
    dataset = _C.Dataset(tensors, batch_size, shuffle, drop_last, generator, False)
    loop = _C.Loop(dataset, choice.step)
    extra = dict(extra or {})
    step = step_offset
    try:
        while True:
            model.train()
            started = time.perf_counter()
            with _interrupt_at_step_boundary(loop):
                if every is None:
                    stats = loop.run(dataset.batches_per_epoch, True)
                else:
                    stats = loop.run(every, False)
            elapsed = time.perf_counter() - started
            step += 1
            yield Event(
                model=model,
                step=step,
                train_loss=stats.loss_sum / stats.samples,
                train_time_sec=elapsed,
                **extra,
                epoch=dataset.epochs_completed,
                updates=loop.total_steps,
                samples_per_sec=stats.samples / elapsed if elapsed > 0 else float("inf"),
                engine=choice.name,
            )
    finally:
        del loop, dataset, choice


@contextmanager
def _interrupt_at_step_boundary(loop: Any) -> Iterator[None]:
    """Turn Ctrl-C during a window into a KeyboardInterrupt raised between two steps, never inside one.

    Only Python's default SIGINT handler is replaced, and only from the main thread; a handler the user
    installed runs as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: loop.request_interrupt())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
