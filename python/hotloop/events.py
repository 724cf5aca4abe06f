"""The event type yielded by ``fit``: a plain dict with typed keys for editors."""

from __future__ import annotations

from typing import Any, Literal, overload

from torch import nn


class Event(dict[str, Any]):
    """One training event: a ``dict`` with well-known keys.

    ``model``, ``step``, ``train_loss`` and ``train_time_sec`` are fitstream's keys; hotloop adds
    ``epoch``, ``updates``, ``samples_per_sec`` and ``engine``.

    Example:
        >>> event = Event(step=3, train_loss=0.25)
        >>> event["step"], isinstance(event, dict)
        (3, True)
    """

    @overload
    def __getitem__(self, key: Literal["model"]) -> nn.Module: ...

    @overload
    def __getitem__(self, key: Literal["step", "epoch", "updates"]) -> int: ...

    @overload
    def __getitem__(self, key: Literal["train_loss", "train_time_sec", "samples_per_sec"]) -> float: ...

    @overload
    def __getitem__(self, key: Literal["engine"]) -> str: ...

    @overload
    def __getitem__(self, key: str) -> Any: ...

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(key)
