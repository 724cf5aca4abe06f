"""The aot engine: the whole training step (forward, backward, the optimizer's update) compiled by AOTInductor
(``aot_compile``) and run from the C++ loop, with the native step running what has no package.

``engine="aot"`` compiles the step of the epoch's full batch size before training (cached on disk; a cached
package is only checked), and raises when it cannot. Under ``engine="auto"`` on the CPU the run starts
natively (and reports ``engine="native"``); a cached package is used at once, and otherwise a background
compile starts once the run has trained natively for ``HOTLOOP_AOT_AFTER`` seconds of window time (default
20; ``0`` compiles from the start, ``never`` only uses cached packages). The run switches to the package at
the next window boundary after it is ready and checked. A failure there warns (``SlowPathWarning``) and
the run stays native.

The last batch of an epoch, when smaller (``drop_last=False``), runs natively: one step per epoch is not
worth a second compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import aot_compile, op_capture
from .._native import _C
from .._shared import CaptureError, SlowPathWarning, batch_sizes, example_batches
from ..clipping import stepped_params
from ..fidelity import UserState
from ..op_capture import _split_parameters
from ..plan import Plan
from .base import EngineRun
from .native import NativeEngine

DEFAULT_AFTER_SEC = 20.0


def compile_after() -> float | None:
    """Seconds of native window time after which ``engine="auto"`` compiles in the background
    (``HOTLOOP_AOT_AFTER``; None: never)."""
    text = os.environ.get("HOTLOOP_AOT_AFTER", "").strip().lower()
    if not text:
        return DEFAULT_AFTER_SEC
    if text in ("never", "off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"HOTLOOP_AOT_AFTER must be a number of seconds or 'never', got {text!r}") from None
    if value < 0:
        raise ValueError(f"HOTLOOP_AOT_AFTER must be >= 0, got {value}")
    return value


class AotEngine:
    name = "aot"
    auto_devices = ("cpu",)
    wraps = "native"  # its run is the native engine's, with the step wrapped

    def refuse(self, plan: Plan) -> str | None:
        if plan.device.type != "cpu":
            return "the aot engine runs on the CPU only (so far)"
        if plan.data_parallel is not None:
            return "the aot engine does not run data-parallel training"
        reason = NativeEngine().refuse(plan)  # the native step runs the batch sizes without a package
        if reason is not None:
            return reason
        if plan.engine == "aot":
            return aot_compile.compiler_missing() or _update_reason(plan)
        return None

    def build(self, plan: Plan) -> EngineRun:
        """The native engine's run, with its step wrapped in a ``_C.AotStep`` that runs the package."""
        native = NativeEngine().build(plan)
        params, _ = _tensors(plan)
        update, reason = aot_compile.update_of(plan.optimizer, params)
        if update is None:
            if plan.engine == "aot":
                raise CaptureError(reason)
            return native  # auto: nothing to compile; the native engine as it is
        if plan.engine == "auto" and aot_compile.slower_compiled(plan.module) is not None:
            return native
        try:
            windows = _AotWindows(plan, native, update)
        except TypeError:  # the native engine's step is not one the aot step can wrap
            if plan.engine == "aot":
                raise
            return native
        if plan.engine == "aot":
            windows.compile_now()
        else:
            windows.use_cached()
        return windows.run


def _update_reason(plan: Plan) -> str | None:
    return aot_compile.update_of(plan.optimizer, _tensors(plan)[0])[1]


class _AotWindows:
    """The native engine's run plus the package: when to compile, when to switch, what to check."""

    def __init__(self, plan: Plan, native: EngineRun, update: aot_compile.Update) -> None:
        self.plan, self.native, self.update = plan, native, update
        self.params, self.buffers = _tensors(plan)
        self.step = _C.AotStep(
            native.step, self.params, self.buffers, update.native_kind, update.state_lists, len(plan.metrics)
        )
        self.run = EngineRun(
            "native",
            self.step,
            begin_window=self.begin_window,
            end_window=self.end_window,
            reuse_buffers=native.reuse_buffers,
        )
        # Python state that forward reads is compiled in: when it changes, the package no longer fits.
        self.watched = UserState(plan.module, plan.loss_fn, tensors=False)
        sizes = batch_sizes(plan.train_data[0].shape[0], plan.step_samples, plan.drop_last)
        self.batch_size = sizes[0]  # the epoch's full batches (the only size when all fit in one)
        self.native_seconds = 0.0
        self.window_started: float | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.pending: tuple[Path, Any] | None = None  # (package path, the joint graph it was exported from)
        self.tried = False  # the background compile ran (or was refused): it is not tried again
        self.compile_seconds: float | None = None
        self.log = Path()  # the background compile's stderr, once it runs
        self.started = 0.0  # when it started

    # -- what the package is made from

    def _joint(self) -> tuple[Any, list[torch.Tensor]]:
        plan = self.plan
        batches = example_batches(plan.train_data, plan.step_samples, plan.drop_last, plan.shuffle)
        batch = [t.contiguous() for t in next(b for b in batches if b[0].shape[0] == self.batch_size)]
        gradients = op_capture.Gradients(
            plan.accumulate,
            plan.batch_size,
            plan.grad_clip,
            tuple(stepped_params(plan.optimizer) if plan.grad_clip is not None else ()),
        )
        snapshot = UserState(plan.module, plan.loss_fn)  # tracing leaves the user's objects as they were
        try:
            joint = op_capture.trace_step(
                plan.module,
                plan.loss_fn,
                batch,
                last_label=plan.last_label,
                metrics=plan.metric_fns,
                gradients=gradients,
            )
        finally:
            snapshot.restore()
        reason = aot_compile.random_reason(joint)
        if reason is not None:
            raise CaptureError(reason)
        return joint, batch

    def _check_and_install(self, path: Path, joint: Any, batch: list[torch.Tensor]) -> None:
        self.params, self.buffers = _tensors(self.plan)
        self.step.bind(self.params, self.buffers)
        self.watched = UserState(self.plan.module, self.plan.loss_fn, tensors=False)
        aot_compile.verify_package(
            path,
            joint,
            self.update,
            self.plan.optimizer,
            self.params,
            self.buffers,
            batch,
            len(self.plan.metrics),
        )
        self.step.add_package(self.batch_size, str(path))
        self.run.name = "aot"

    def compile_now(self) -> None:
        """``engine="aot"``: the package, compiled now unless cached; CaptureError says why not."""
        joint, batch = self._joint()
        inputs = aot_compile.example_inputs(self.update, self.params, self.buffers, batch)
        compiled = aot_compile.package_for(
            joint, self.update, len(self.plan.metrics), inputs, compile_now=True
        )
        assert compiled is not None
        self.compile_seconds = compiled.seconds
        self._check_and_install(compiled.path, joint, batch)

    def use_cached(self) -> None:
        """``engine="auto"``: a cached package switches the run to aot at once; else it starts native."""
        if not any(aot_compile.cache_dir().glob("*.pt2")):
            return
        try:
            joint, batch = self._joint()
            inputs = aot_compile.example_inputs(self.update, self.params, self.buffers, batch)
            cached = aot_compile.package_for(
                joint, self.update, len(self.plan.metrics), inputs, compile_now=False
            )
            if cached is not None:
                self._check_and_install(cached.path, joint, batch)
                self.tried = True
        except CaptureError as exc:
            self._give_up(str(exc))

    # -- the background compile (engine="auto")

    def _maybe_start(self) -> None:
        after = compile_after()
        if self.tried or after is None or self.native_seconds < after:
            return
        self.tried = True
        reason = aot_compile.compiler_missing()
        if reason is not None:
            self._give_up(reason)
            return
        try:
            joint, batch = self._joint()
            inputs = aot_compile.example_inputs(self.update, self.params, self.buffers, batch)
            flat = [t for part in inputs for t in (part if isinstance(part, list) else [part])]
            key = aot_compile.cache_key(joint, self.update, len(self.plan.metrics), flat)
            path = aot_compile.cache_dir() / f"{key}.pt2"
            if not path.exists():
                exported = aot_compile.export_step(joint, self.update, len(self.plan.metrics), inputs)
                folder = Path(tempfile.mkdtemp(prefix="hotloop-aot-"))
                saved = folder / "step.pt2"
                torch.export.save(exported, str(saved))
                self.log = folder.with_suffix(".log")  # a file, not a pipe: a full pipe would stall the child
                with open(self.log, "wb") as log:
                    self.worker = subprocess.Popen(
                        [sys.executable, "-m", "hotloop.aot_compile", str(saved), str(path)],
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                    )
                self.started = time.perf_counter()
            self.pending = (path, (joint, batch))
        except CaptureError as exc:
            self._give_up(str(exc))

    def _maybe_switch(self) -> None:
        if self.pending is None:
            return
        if self.worker is not None:
            code = self.worker.poll()
            if code is None:
                return
            stderr = self.log.read_text(errors="replace") if self.log.exists() else ""
            self.log.unlink(missing_ok=True)
            self.worker = None
            self.compile_seconds = time.perf_counter() - self.started
            if code != 0:
                self.pending = None
                tail = stderr.strip().splitlines()[-1:] or [f"exit code {code}"]
                self._give_up(f"AOTInductor failed to compile the step ({tail[0]})")
                return
        path, (joint, batch) = self.pending
        self.pending = None
        try:
            self._check_and_install(path, joint, batch)
        except CaptureError as exc:
            self._give_up(str(exc))

    def _give_up(self, reason: str) -> None:
        self.step.clear_packages()
        self.run.name = "native"
        warnings.warn(
            f"hotloop keeps the native engine: the aot engine cannot run this training step: {reason}",
            SlowPathWarning,
            stacklevel=2,
        )

    # -- the window boundary

    def begin_window(self, planned_steps: int) -> None:
        assert self.native.begin_window is not None
        self.native.begin_window(planned_steps)  # reads lr, schedules and replaced tensors afresh
        if self.step.package_batch_sizes or self.pending is not None:
            self._check_still_fits()
        if self.plan.engine != "aot":
            self._maybe_switch()
            self._maybe_start()
        self.window_started = time.perf_counter()

    def _check_still_fits(self) -> None:
        """Follow replaced tensors; a change of what is compiled in (Python state that forward reads, the
        optimizer's structure) ends aot for this run."""
        params, buffers = _tensors(self.plan)
        if any(a is not b for a, b in zip([*params, *buffers], [*self.params, *self.buffers], strict=True)):
            self.params, self.buffers = params, buffers
            self.step.bind(params, buffers)
        changed = self.watched.changes()
        update, _ = aot_compile.update_of(self.plan.optimizer, self.params)
        if changed or update != self.update:
            what = "Python state that forward reads" if changed else "the optimizer's options"
            self.pending, self.tried = None, True  # a new package could go stale again: this run stays native
            self._give_up(f"{what} changed since the step was compiled")

    def end_window(self) -> None:
        if self.window_started is not None and not self.step.package_batch_sizes:
            self.native_seconds += time.perf_counter() - self.window_started
        self.window_started = None
        assert self.native.end_window is not None
        self.native.end_window()

    def __del__(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill()


def _tensors(plan: Plan) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's trainable parameters and its other tensors, in the order the native graphs take them."""
    _, trainable, _, state = _split_parameters(plan.module)
    return trainable, state
