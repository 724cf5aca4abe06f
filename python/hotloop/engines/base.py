"""The engine interface: what every engine (python, native, CUDA graph) implements, and what it hands back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..plan import Plan


@dataclass
class EngineRun:
    """A built engine, as the session drives it."""

    name: str
    step: Any  # a _C.HostStep (python) or _C.DeviceStep (native, graph): the Loop runs it once per batch
    # Before each Loop.run, with the number of steps the window will take unless it stops early (the engine
    # reads lr and the user's objects afresh); and after it, even when it raised.
    begin_window: Callable[[int], None] | None = None
    end_window: Callable[[], None] | None = None
    reuse_buffers: bool = False  # the step never keeps a batch past its run: the Dataset may reuse them
    reason: str | None = None  # why faster engines were not used (set by choose_engine)


class Engine(Protocol):
    """One way to run a training step. ``choose_engine`` tries them in order of speed."""

    name: str
    auto_devices: tuple[str, ...]  # the data's device types on which engine="auto" tries this engine

    def refuse(self, plan: Plan) -> str | None:
        """Why this engine cannot run ``plan``, found without capturing anything; None if it may."""
        ...

    def build(self, plan: Plan) -> EngineRun:
        """Capture and set up the step; raises CaptureError with the reason when that fails."""
        ...
