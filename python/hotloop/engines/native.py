"""The native engine: the joint ATen graph (op_capture) run in C++, then a native optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import distributed, op_capture, optim
from .._native import _C
from .._shared import example_batches
from ..clipping import stepped_params
from ..fidelity import UserState
from ..plan import Plan
from ..speed_rules import channels_last_faster, one_thread_suffices, slower_natively
from .base import EngineRun


class NativeEngine:
    name = "native"
    auto_devices = ("cpu", "cuda")

    def refuse(self, plan: Plan) -> str | None:
        if plan.engine == "auto" and plan.device.type == "cpu":
            slower = slower_natively(plan.module)
            if slower is not None:
                return slower
        if plan.amp is not None:
            return "it does not run mixed precision (amp)"
        kind = type(plan.optimizer)
        if plan.device.type != "cpu" and plan.guard_nonfinite and kind not in optim.SKIPS_ON_DEVICE:
            return (
                f"off the CPU the non-finite guard skips steps on the device, which {kind.__name__} cannot "
                "(only SGD, Adam and AdamW can); pass on_nonfinite='continue' (and no error_if_nonfinite in "
                "clip_grad_norm) to run it natively"
            )
        if plan.data_parallel is not None:
            if plan.grad_clip is not None or plan.accumulate > 1:
                # DDP clips the all-reduced gradients and all-reduces every micro-batch's backward; the
                # native data-parallel graph does neither (yet)
                return (
                    "data-parallel training with clip_grad_norm, clip_grad_value or accumulate is not native"
                )
            reason = distributed.native_refusal(plan.data_parallel)
            if reason is not None:
                return reason
        return optim.native_refusal(plan.optimizer)

    def build(self, plan: Plan) -> EngineRun:
        """Captures the step (raising CaptureError with the reason); a per-step scheduler is run ahead
        through each window (``optim.schedule_window``) and the native optimizer takes its learning rates
        (and momenta) step by step."""
        handle, reason = optim.native_optimizer(plan.optimizer)
        if handle is None:
            raise op_capture.CaptureError(reason)
        native = _NativeWindows(plan, handle)
        return EngineRun(
            self.name,
            native.step,
            begin_window=native.begin_window,
            end_window=native.end_window,
            reuse_buffers=True,  # NativeStep keeps no batch past its run
        )


class _NativeWindows:
    """The captured step and what keeps the user's objects true at every window boundary."""

    def __init__(self, plan: Plan, handle: Any) -> None:
        self.plan, self.handle = plan, handle
        self.captured = self._capture()
        self.clipped_ids = [id(p) for p in self._clipped()]
        # Python state that forward reads (a temperature a stage anneals between events) is baked into the
        # graphs: when it changes, they are captured again.
        self.watched = UserState(plan.module, plan.loss_fn, tensors=False)
        self.step = _C.NativeStep(
            self.captured.params,
            self.captured.state,
            list(self.captured.graphs.items()),
            [list(t.shape[1:]) for t in plan.train_data],
            self._not_stepped(),
            handle,
        )
        self._limit_threads(self.captured)
        self.settle: list[Callable[[int], None]] = []

    def _limit_threads(self, captured: op_capture.CapturedStep) -> None:
        names = {name for graph in captured.graphs.values() for name in graph.op_names}
        tiny = one_thread_suffices(captured.largest_tensor, names, self.plan.device)
        self.step.window_threads = 1 if tiny else 0

    def _capture(self) -> op_capture.CapturedStep:
        plan, data_parallel = self.plan, self.plan.data_parallel
        if data_parallel is not None:
            batches = distributed.example_batches(
                data_parallel, plan.train_data, plan.batch_size, plan.drop_last
            )
        else:
            batches = example_batches(plan.train_data, plan.step_samples, plan.drop_last, plan.shuffle)
        local = data_parallel is not None and data_parallel.sync_every is not None  # local SGD: no sync

        def capture(channels_last: bool) -> op_capture.CapturedStep:
            return op_capture.capture_step(
                plan.module,
                plan.loss_fn,
                batches,
                last_label=plan.last_label,
                metrics=plan.metric_fns,
                gradients=op_capture.Gradients(
                    plan.accumulate, plan.batch_size, plan.grad_clip, tuple(self._clipped())
                ),
                data_parallel=None if local else data_parallel,
                channels_last=channels_last,
            )

        if plan.memory_format == "auto" and channels_last_faster(plan.module, plan.device):
            try:
                return capture(True)
            except op_capture.CaptureError:
                pass  # e.g. dropout draws its mask in memory order: the user's layout may still capture
        return capture(plan.memory_format == "channels_last")

    def _clipped(self) -> list[Any]:
        return stepped_params(self.plan.optimizer) if self.plan.grad_clip is not None else []

    def _not_stepped(self) -> list[bool]:
        # a plain loop's zero_grad() never reaches these, so their .grad sums over steps
        stepped = {id(p) for group in self.plan.optimizer.param_groups for p in group["params"]}
        return [id(p) not in stepped for p in self.captured.params]

    def begin_window(self, planned_steps: int) -> None:
        plan, captured = self.plan, self.captured
        if captured.refresh(plan.module):
            self.step.bind(captured.params, captured.state)
        changed = self.watched.changes()
        if [id(p) for p in self._clipped()] != self.clipped_ids:
            changed = [*changed, "the optimizer's parameters (which clip_grad_norm clips)"]
            self.clipped_ids = [id(p) for p in self._clipped()]
        if changed:
            try:
                fresh = self._capture()
            except op_capture.CaptureError as exc:
                raise RuntimeError(
                    f"{', '.join(changed[:3])} changed since the native engine captured the step, and "
                    f"capturing it again failed: {exc}"
                ) from exc
            self.step.set_graphs(list(fresh.graphs.items()))
            self._limit_threads(fresh)
            self.watched = UserState(plan.module, plan.loss_fn, tensors=False)
        self.step.set_accumulate(self._not_stepped())  # param groups may have been added
        schedule: dict[str, Any] = {}
        if plan.step_scheduler is not None:
            schedule, rewind = optim.schedule_window(plan.step_scheduler, planned_steps)
            self.settle.append(rewind)
        optim.configure_window(self.handle, plan.optimizer, captured.params, **schedule)

    def end_window(self) -> None:
        taken = self.handle.steps_in_window
        optim.finish_window(self.handle, self.plan.optimizer)
        while self.settle:
            self.settle.pop()(taken)
