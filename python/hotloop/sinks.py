"""Sinks: consume an event stream into a list, a JSON Lines or CSV file, a DataFrame, or TensorBoard.

``model`` is never written: it is dropped from every record unless explicitly, and uselessly, included.
"""

from __future__ import annotations

import csv
import json
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

Filter = Sequence[str] | None


def _check_keys(name: str, keys: Any) -> None:
    if keys is None:
        return
    if isinstance(keys, str) or not isinstance(keys, (Sequence, set, frozenset)):
        raise TypeError(f"{name} must be a sequence of str or None, got {type(keys).__name__}")
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"{name} must contain only str keys, got {type(key).__name__}")


def _check_filters(include: Any, exclude: Any) -> None:
    if include is not None and exclude is not None:
        raise ValueError("Provide only one of include or exclude.")
    _check_keys("include", include)
    _check_keys("exclude", exclude)


def _check_dest(dest: Any) -> None:
    if not isinstance(dest, (str, os.PathLike)) and not callable(getattr(dest, "write", None)):
        raise TypeError(f"dest must be a path or a text file with write(), got {type(dest).__name__}")


def _select(event: dict[str, Any], include: Filter, exclude: Filter) -> dict[str, Any]:
    """A shallow copy of ``event`` without ``model``, restricted to ``include`` or without ``exclude``."""
    if include is not None:
        return {key: event[key] for key in include if key != "model" and key in event}
    dropped = {"model", *(exclude or ())}
    return {key: value for key, value in event.items() if key not in dropped}


def collect(
    events: Iterable[dict[str, Any]],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Consume ``events`` into a list of shallow-copied dicts, without ``model``.

    Give ``include`` to keep only those keys (keys an event lacks are skipped) or ``exclude`` to drop
    keys besides ``model``; not both.

    Example:
        >>> events = [{"step": 1, "train_loss": 0.5, "model": None}, {"step": 2, "train_loss": 0.25}]
        >>> collect(events)
        [{'step': 1, 'train_loss': 0.5}, {'step': 2, 'train_loss': 0.25}]
        >>> collect(events, exclude=["train_loss"])
        [{'step': 1}, {'step': 2}]
    """
    _check_filters(include, exclude)
    return [_select(event, include, exclude) for event in events]


def collect_jsonl(
    events: Iterable[dict[str, Any]],
    dest: str | os.PathLike[str] | TextIO,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> None:
    """Write each event as one JSON object per line to ``dest`` (a path, overwritten, or a text file).

    ``model`` is dropped and ``include``/``exclude`` filter as in :func:`collect`; the remaining values
    must be JSON-serialisable (``json.dumps``).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> collect_jsonl([{"step": 1, "train_loss": 0.5, "model": None}], out)
        >>> out.getvalue()
        '{"step": 1, "train_loss": 0.5}\\n'
    """
    _check_filters(include, exclude)
    _check_dest(dest)
    if isinstance(dest, (str, os.PathLike)):
        with Path(dest).open("w") as handle:
            collect_jsonl(events, handle, include=include, exclude=exclude)
        return
    for event in events:
        dest.write(json.dumps(_select(event, include, exclude)) + "\n")


def collect_pd(
    events: Iterable[dict[str, Any]],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Any:
    """Consume ``events`` into a pandas ``DataFrame``, one row per event (filtered as in :func:`collect`).

    pandas is optional; without it this raises ``ImportError``.

    Example:
        >>> events = [{"step": 1, "train_loss": 0.5, "model": None}, {"step": 2, "train_loss": 0.25}]
        >>> frame = collect_pd(events)
        >>> list(frame.columns), frame["train_loss"].tolist()
        (['step', 'train_loss'], [0.5, 0.25])
    """
    _check_filters(include, exclude)
    try:
        import pandas as pd
    except ImportError as error:
        raise ImportError("pandas is required for collect_pd.") from error
    return pd.DataFrame([_select(event, include, exclude) for event in events])


def _cell(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().cpu().item()
    return value


def collect_csv(
    events: Iterable[dict[str, Any]],
    dest: str | os.PathLike[str] | TextIO,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> None:
    """Write ``events`` as CSV to ``dest`` (a path, overwritten, or a text file), one row per event.

    The header is the union of the (filtered) keys in the order they are first seen (in ``include``'s
    order when given), so the whole stream is read before anything is written; an event without a
    column leaves its cell empty. ``model`` is
    dropped and ``include``/``exclude`` filter as in :func:`collect`. Single-element tensors are written
    as numbers, other values with ``str``.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> collect_csv([{"step": 1, "train_loss": 0.5, "model": None}, {"step": 2, "val_loss": 0.7}], out)
        >>> print(out.getvalue(), end="")
        step,train_loss,val_loss
        1,0.5,
        2,,0.7
    """
    _check_filters(include, exclude)
    _check_dest(dest)
    rows = [
        {key: _cell(value) for key, value in _select(event, include, exclude).items()} for event in events
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if include is not None:
        columns = [key for key in dict.fromkeys(include) if key in columns]
    if isinstance(dest, (str, os.PathLike)):
        with Path(dest).open("w", newline="") as handle:
            _write_csv(rows, columns, handle)
    else:
        _write_csv(rows, columns, dest)


def _write_csv(rows: list[dict[str, Any]], columns: list[str], handle: TextIO) -> None:
    writer = csv.DictWriter(handle, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def _scalar(value: Any) -> float | None:
    """``value`` as a float when it is a real number or a single-element tensor, else ``None``."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item()) if value.numel() == 1 else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


class TensorBoardTap:
    """The callback returned by :func:`tensorboard`: writes scalars per event; usable as a context manager."""

    def __init__(self, writer: Any, keys: tuple[str, ...] | None) -> None:
        self.writer = writer
        self._keys = keys

    def __call__(self, event: dict[str, Any]) -> None:
        step = int(event["step"])
        if self._keys is None:
            for key, value in event.items():
                number = None if key in ("model", "step") else _scalar(value)
                if number is not None:
                    self.writer.add_scalar(key, number, step)
        else:
            for key in self._keys:
                if key not in event:
                    continue
                number = _scalar(event[key])
                if number is None:
                    raise TypeError(
                        f"tensorboard: event[{key!r}] must be a number or a single-element tensor, "
                        f"got {type(event[key]).__name__}"
                    )
                self.writer.add_scalar(key, number, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()

    def __enter__(self) -> TensorBoardTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def tensorboard(log_dir: str | os.PathLike[str], keys: Sequence[str] | None = None) -> TensorBoardTap:
    """A ``tap`` callback that writes event values as TensorBoard scalars at ``event["step"]``.

    With ``keys=None`` every real-number or single-element-tensor value except ``step`` is written;
    otherwise only ``keys`` (an event lacking one skips it; a non-numeric value raises ``TypeError``).
    Each event is flushed to disk; ``close()`` the callback (or use it in a ``with`` block) at the end.
    Needs the ``tensorboard`` package (``pip install tensorboard``).

    Example:
        >>> import tempfile
        >>> from hotloop import pipe, tap
        >>> with tempfile.TemporaryDirectory() as log_dir:  # doctest: +SKIP
        ...     with tensorboard(log_dir, keys=["train_loss"]) as tb:
        ...         _ = list(pipe([{"step": 1, "train_loss": 0.5}], tap(tb)))
    """
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a path, got {type(log_dir).__name__}")
    _check_keys("keys", keys)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "tensorboard needs the tensorboard package. Install it with: pip install tensorboard"
        ) from error
    return TensorBoardTap(SummaryWriter(log_dir=os.fspath(log_dir)), None if keys is None else tuple(keys))
