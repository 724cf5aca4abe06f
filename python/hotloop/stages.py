"""Stream stages: plain functions from an event iterable to an event iterable, composed with ``pipe``.

Names, arguments, defaults and error messages follow fitstream 0.4.1 so either library's stages compose.
"""

from __future__ import annotations

import numbers
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, Literal

import torch

from . import _checks as check
from ._shared import running_window

Transform = Callable[[Iterable[dict[str, Any]]], Iterable[dict[str, Any]]]


def _check_real(name: str, value: Any) -> float:
    """A real number (``bool`` excluded), as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _is_iterable(value: Any) -> bool:
    return isinstance(value, Iterable) or hasattr(type(value), "__getitem__")


def pipe(stream: Iterable[dict[str, Any]], *stages: Transform) -> Iterable[dict[str, Any]]:
    """Apply ``stages`` to ``stream`` from left to right: ``pipe(s, f, g)`` is ``g(f(s))``.

    Every stage is lazy, so nothing is pulled from ``stream`` until the result is iterated.

    Example:
        >>> events = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0}]
        >>> halve = augment(lambda event: {"half": event["loss"] / 2})
        >>> [event["half"] for event in pipe(events, halve, take(2))]
        [2.0, 1.0]
    """
    if not _is_iterable(stream):
        raise TypeError(f"stream must be an iterable of events, got {type(stream).__name__}")
    for stage in stages:
        if not callable(stage):
            raise TypeError("pipe stages must be callable.")
    for stage in stages:
        stream = stage(stream)
    return stream


def augment(fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Transform:
    """A stage that merges the dict returned by ``fn(event)`` into each event (a new dict per event).

    ``fn`` may return ``None`` (or an empty dict) to add nothing; returning anything else that is not a
    dict raises ``TypeError`` when that event is reached.

    Example:
        >>> double = augment(lambda event: {"twice": 2 * event["x"]} if event["x"] > 1 else None)
        >>> list(double([{"x": 1}, {"x": 2}]))
        [{'x': 1}, {'x': 2, 'twice': 4}]
    """
    check.check_callable("fn", fn)

    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for event in events:
            added = fn(event) or {}
            if not isinstance(added, dict):
                raise TypeError("augment function must return a dict or None.")
            yield event | added

    return stage


def take(n: int) -> Transform:
    """A stage that passes on the first ``n`` events and then stops.

    It never pulls an event it will not yield: after the ``n``-th event the input is left where it is (so
    a training stream can be continued), and ``take(0)`` never advances it at all.

    Example:
        >>> events = iter([{"step": 1}, {"step": 2}, {"step": 3}])
        >>> list(take(2)(events))
        [{'step': 1}, {'step': 2}]
        >>> next(events)
        {'step': 3}
    """
    check.check_int("n", n)
    if n < 0:
        raise ValueError("n must be >= 0.")

    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from islice(events, n)

    return stage


def tap(fn: Callable[[dict[str, Any]], Any], *, every: int = 1, start: int = 1) -> Transform:
    """A stage that calls ``fn(event)`` for its side effect and passes every event on unchanged.

    ``fn`` sees events number ``start``, ``start + every``, ``start + 2 * every``, ... (counted from 1).
    It runs before the event is passed on.

    Example:
        >>> seen = []
        >>> events = [{"step": s} for s in range(1, 8)]
        >>> out = list(tap(lambda event: seen.append(event["step"]), every=3, start=2)(events))
        >>> seen, len(out)
        ([2, 5], 7)
    """
    if not callable(fn):
        raise TypeError("tap requires a callable.")
    check.check_int("every", every)
    if every < 1:
        raise ValueError("every must be >= 1.")
    check.check_int("start", start)
    if start < 1:
        raise ValueError("start must be >= 1.")

    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for count, event in enumerate(events, start=1):
            if count >= start and (count - start) % every == 0:
                fn(event)
            yield event

    return stage


def tick(fn: Callable[[], Any]) -> Transform:
    """A stage that calls ``fn()`` (no arguments) once per event, before passing the event on unchanged.

    Handy for per-epoch hooks that do not read the event, such as ``scheduler.step``.

    Example:
        >>> calls = []
        >>> list(tick(lambda: calls.append(1))([{"step": 1}, {"step": 2}]))
        [{'step': 1}, {'step': 2}]
        >>> len(calls)
        2
    """
    if not callable(fn):
        raise TypeError("tick requires a callable.")

    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for event in events:
            fn()
            yield event

    return stage


def print_keys(
    *keys: str,
    precision: int = 4,
    include_step: bool = True,
    step_key: str = "step",
) -> Callable[[dict[str, Any]], None]:
    """A ``tap`` callback that prints ``keys`` of an event on one line.

    The step comes first (zero-padded to four digits when it is an integer) unless ``include_step`` is
    false or the event has no ``step_key``. Numbers and single-element tensors are printed with
    ``precision`` digits after the point, booleans as ``True``/``False``, anything else with ``str``;
    a missing key prints as ``key=NA``.

    Example:
        >>> show = tap(print_keys("train_loss", "lr", precision=2))
        >>> _ = list(show([{"step": 7, "train_loss": 0.4567, "lr": 0.1}, {"step": 8, "train_loss": 0.3}]))
        step=0007 train_loss=0.46 lr=0.10
        step=0008 train_loss=0.30 lr=NA
    """
    for key in keys:
        _check_str("keys", key)
    check.check_int("precision", precision)
    check.check_bool("include_step", include_step)
    _check_str("step_key", step_key)
    if precision < 0:
        raise ValueError("precision must be >= 0.")
    if not keys and not include_step:
        raise ValueError("Provide at least one key when include_step=False.")

    def show(value: Any) -> str:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return f"{float(value.detach().cpu().item()):.{precision}f}"
        if isinstance(value, bool):
            return str(value)
        if isinstance(value, (int, float)):
            return f"{float(value):.{precision}f}"
        return str(value)

    def callback(event: dict[str, Any]) -> None:
        parts = []
        if include_step and step_key in event:
            try:
                parts.append(f"{step_key}={int(event[step_key]):04d}")
            except Exception:
                parts.append(f"{step_key}={event[step_key]}")
        for key in keys:
            parts.append(f"{key}={show(event[key])}" if key in event else f"{key}=NA")
        print(" ".join(parts))

    return callback


def ema(
    key: str,
    *,
    decay: float | None = None,
    half_life: float | None = None,
    out_key: str | None = None,
    bias_correction: bool = True,
) -> Transform:
    """A stage that adds the exponential moving average of ``event[key]`` as ``out_key`` (``key + "_ema"``).

    Give exactly one of ``decay`` (in ``(0, 1)``) or ``half_life`` (in events; ``decay = 2 ** (-1 /
    half_life)``). The average starts at zero and follows ``m = decay * m + (1 - decay) * x``; with
    ``bias_correction`` the reported value is ``m / (1 - decay ** t)`` after ``t`` events, so the first
    value equals the first input. Every event must carry ``key`` (else ``KeyError``) with a value that
    ``float()`` accepts.

    Example:
        >>> events = [{"loss": 4.0}, {"loss": 2.0}, {"loss": 2.0}]
        >>> [round(e["loss_ema"], 3) for e in ema("loss", half_life=1)(events)]
        [4.0, 2.667, 2.286]
        >>> [e["smooth"] for e in ema("loss", decay=0.5, out_key="smooth", bias_correction=False)(events)]
        [2.0, 2.0, 2.0]
    """
    _check_str("key", key)
    if decay is not None:
        decay = _check_real("decay", decay)
    if half_life is not None:
        half_life = _check_real("half_life", half_life)
    if out_key is not None:
        _check_str("out_key", out_key)
    check.check_bool("bias_correction", bias_correction)
    if (decay is None) == (half_life is None):
        raise ValueError("Provide exactly one of decay or half_life.")
    if half_life is not None:
        if half_life <= 0.0:
            raise ValueError("half_life must be > 0.")
        rate = 2.0 ** (-1.0 / half_life)
    else:
        rate = float(decay)  # type: ignore[arg-type]
    if not 0.0 < rate < 1.0:
        raise ValueError("decay must be in (0, 1).")
    name = out_key or f"{key}_ema"

    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        average = 0.0
        for t, event in enumerate(events, start=1):
            average = rate * average + (1.0 - rate) * float(event[key])
            yield event | {name: average / (1.0 - rate**t) if bias_correction else average}

    return stage


def early_stop(
    key: str,
    patience: int,
    *,
    mode: Literal["min", "max"] = "min",
    min_delta: float = 0.0,
) -> Transform:
    """A stage that ends the stream once ``event[key]`` has not improved for ``patience`` events in a row.

    An event improves when its value beats the best so far by more than ``min_delta`` (lower is better
    for ``mode="min"``, higher for ``"max"``); the first event always improves. The event that uses up
    the patience is still passed on, then the stage stops pulling from its input.

    Example:
        >>> losses = [5.0, 4.0, 4.5, 4.2, 3.0]
        >>> [e["val_loss"] for e in early_stop("val_loss", patience=2)({"val_loss": v} for v in losses)]
        [5.0, 4.0, 4.5, 4.2]
    """
    _check_str("key", key)
    check.check_int("patience", patience)
    if patience < 1:
        raise ValueError("patience must be >= 1.")
    if mode not in {"min", "max"}:
        raise ValueError("mode must be one of {'min', 'max'}.")
    min_delta = _check_real("min_delta", min_delta)
    if not min_delta >= 0.0:
        raise ValueError("min_delta must be >= 0.")

    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        best: float | None = None
        stale = 0
        for event in events:
            value = float(event[key])
            if best is None:
                improved = True
            elif mode == "min":
                improved = value < best - min_delta
            else:
                improved = value > best + min_delta
            if improved:
                best, stale = value, 0
            else:
                stale += 1
            yield event
            if stale >= patience:
                return

    return stage


def progress(
    total: int | None = None,
    *,
    keys: Sequence[str] = ("train_loss", "val_loss"),
    desc: str | None = None,
    window: bool = True,
    poll_interval: float = 0.25,
) -> Transform:
    """A stage that shows a tqdm progress bar over the events, with ``keys`` as the bar's postfix.

    With ``window=True`` a second bar follows the training window running inside ``fit`` (its optimizer
    steps), polled every ``poll_interval`` seconds from a helper thread while the native loop runs:
    useful with a large ``every``.

    ``total`` is the expected number of events (``None``: an open-ended counter). Keys missing from an
    event are left out of its postfix; single-element tensors are shown as numbers. The bar is written
    to ``sys.stderr`` only when it is a terminal; otherwise (logs, CI, notebooks) the stage prints
    nothing and just passes the events on. Needs ``tqdm`` (``pip install tqdm``).

    Example:
        >>> events = [{"step": 1, "train_loss": 0.5}, {"step": 2, "train_loss": 0.25}]
        >>> [e["step"] for e in pipe(events, progress(total=2, desc="train"))]
        [1, 2]
    """
    if total is not None:
        check.check_int("total", total)
        if total < 0:
            raise ValueError(f"total must be >= 0 or None, got {total}")
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise TypeError(f"keys must be a sequence of str, got {type(keys).__name__}")
    for key in keys:
        _check_str("keys", key)
    if desc is not None:
        _check_str("desc", desc)
    if not isinstance(window, bool):
        raise TypeError(f"window must be a bool, got {type(window).__name__}")
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, (int, float))
        or not poll_interval > 0
    ):
        raise ValueError(f"poll_interval must be a positive number of seconds, got {poll_interval!r}")
    try:
        from tqdm import tqdm
    except ImportError as error:
        raise ImportError("progress requires tqdm. Install it with: pip install tqdm") from error
    shown = tuple(keys)

    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        stream = sys.stderr
        if stream is None or not _isatty(stream):
            yield from events
            return
        bar = tqdm(total=total, desc=desc, unit="event", file=stream, dynamic_ncols=True)
        watcher = _WindowWatcher(tqdm, stream, poll_interval) if window else None
        try:
            for event in events:
                postfix = {key: _postfix_value(event[key]) for key in shown if key in event}
                if postfix:
                    bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                yield event
        finally:
            if watcher is not None:
                watcher.stop()
            bar.close()

    return stage


class _WindowWatcher:
    """A thread that mirrors the running training window (``running_window``) in a second bar."""

    def __init__(self, tqdm: Any, stream: Any, interval: float) -> None:
        self._tqdm, self._stream, self._interval = tqdm, stream, interval
        self._done = threading.Event()
        self._bar: Any = None
        self._thread = threading.Thread(target=self._watch, name="hotloop-progress", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(self._interval):
            window = running_window()
            if window is None:
                continue
            done, planned = window
            if self._bar is None or self._bar.total != planned:
                if self._bar is not None:
                    self._bar.close()
                self._bar = self._tqdm(
                    total=planned,
                    desc="window",
                    unit="step",
                    file=self._stream,
                    position=1,
                    leave=False,
                    dynamic_ncols=True,
                )
            self._bar.n = min(done, planned)
            self._bar.refresh()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        if self._bar is not None:
            self._bar.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _postfix_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().cpu().item()
    return value
