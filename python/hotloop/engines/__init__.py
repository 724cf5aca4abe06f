"""The engines, fastest first, and the choice between them: a loop over one ordered list."""

from __future__ import annotations

import warnings

from .._shared import CaptureError, SlowPathWarning
from ..plan import Plan
from .aot import AotEngine
from .base import Engine, EngineRun
from .cuda_graph import CudaGraphEngine
from .native import NativeEngine
from .python import PythonEngine, closure_step_required

ENGINES: tuple[Engine, ...] = (CudaGraphEngine(), AotEngine(), NativeEngine(), PythonEngine())

__all__ = ["ENGINES", "Engine", "EngineRun", "choose_engine"]


def choose_engine(plan: Plan) -> EngineRun:
    """The fastest engine that can run ``plan`` (``engine="auto"``: those meant for the data's device, in
    order), or the one asked for, which raises its reason when it cannot. A fallback warns once, with the
    reasons of every faster engine tried."""
    closure_step_required(plan.optimizer)  # an optimizer whose closure contract is unknown fails up front
    wanted = [
        e
        for e in ENGINES
        if e.name == plan.engine or (plan.engine == "auto" and plan.device.type in e.auto_devices)
    ]
    reasons: list[str] = []
    # An engine that wraps another's run (aot wraps native) fails to build where that one fails to capture:
    # the wrapped engine is not built again, and each reason is said once, by the engine it belongs to.
    failed: dict[str, str] = {}
    for engine in wanted:
        wraps = getattr(engine, "wraps", None)
        reason = failed.get(engine.name) or engine.refuse(plan)
        if reason is None:
            try:
                run = engine.build(plan)
            except CaptureError as exc:
                reason = str(exc)
                if wraps is not None and plan.engine == "auto":
                    failed[wraps] = reason
            else:
                if reasons:
                    run.reason = "; ".join(reasons)
                    message = f"hotloop is using the {run.name} engine: {run.reason}"
                    warnings.warn(message, SlowPathWarning, stacklevel=4)
                return run
        if plan.engine == engine.name:
            raise RuntimeError(f"engine={engine.name!r} cannot run this training step: {reason}")
        if wraps is None:  # a wrapping engine refuses what the one it wraps refuses, which says so itself
            reasons.append(f"the {engine.name} engine cannot run this training step: {reason}")
    raise AssertionError("the python engine always runs")  # pragma: no cover
