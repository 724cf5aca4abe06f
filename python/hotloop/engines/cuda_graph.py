"""The graph engine (CUDA): the whole training step captured into CUDA graphs and replayed from C++.

For each batch size an epoch visits (the full batch and, unless dropped, the smaller last one) one CUDA
graph holds the batch gather (``index_select`` from the device-resident data into static buffers, at the
indices in a static index buffer), forward, loss, backward, ``optimizer.step()`` and the window's sums
(one kernel, ``_C.GraphStep.account_step``). Per step C++ copies the batch's slice of the epoch order
into the index buffer and replays the graph; a window synchronises once, at its end.

How the user's objects stay the truth:

- Capture needs eager warm-up steps first (torch's whole-network capture recipe). They run on real
  batches (the first samples of ``train_data``), after which the parameters, buffers, gradients,
  optimizer state and random generators are restored exactly: training then starts from the user's
  state, on the same batches as a plain loop, and the warm-ups are not counted as steps.
- The optimizer step is torch.optim's own, captured with the param groups switched to
  ``fused=True`` (``capturable=True`` for Adam/AdamW) and ``lr`` read from a device tensor; the groups
  get their own flags and ``lr`` back right after capture. Fused kernels round a little differently from
  the default for-each ones (within float32 ulps per step, as the native engine's).
- At every window start the lr tensors take ``param_groups[i]["lr"]`` (so lr changes and per-event
  schedulers work), and state tensors replaced since the last window (``load_state_dict``) are copied
  into the captured ones. Other hyperparameters are baked into the graphs: changing them is an error.
- At every window end ``optimizer.state`` is what the user's optimizer keeps (for a non-fused,
  non-capturable Adam the step counts are CPU tensors again) and each ``param.grad`` is the last batch's
  gradient.
- Mixed precision (``amp="bf16"`` or ``"fp16"``): forward and loss run under ``torch.autocast`` (weight
  cast cache off, as capture requires); fp16 adds loss scaling with ``torch.amp.GradScaler``'s defaults and
  algorithm (unscale, skip the step on inf/NaN gradients, grow or back off the scale), all on the device.
  The scale lives as long as the ``fit`` stream; it is not part of its state dict.
- Non-finite guard: a non-finite loss raises a sticky ``found_inf`` flag that the fused optimizer honours
  (the update is skipped and the step count restored), so that step and every later step of the window
  are skipped on the device; the Loop reads the flag once, at the window end, and reports the step. Unlike
  the eager engines, the batches after it in the window are consumed as well.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from .._native import _C
from .._shared import CaptureError, batch_sizes, forward_and_loss, named_tensors
from ..fidelity import python_state_changes, refusal_reason, stateful_reason
from ..optim import native_refusal, scalar_dtype
from ..plan import Plan
from .base import EngineRun

WARMUP_STEPS = 3
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# torch.amp.GradScaler's defaults
INITIAL_SCALE, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0**16, 2.0, 0.5, 2000

# Hyperparameters read when the step is captured; only ``lr`` may change afterwards.
_BAKED = {
    SGD: ("momentum", "dampening", "nesterov", "weight_decay", "maximize"),
    Adam: ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
    AdamW: ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
}


def graph_refusal(
    model: nn.Module,
    optimizer: Optimizer,
    *,
    train_data: Sequence[torch.Tensor],
    scheduler: Any | None = None,
    loss_fn: Callable[..., Any] | None = None,
) -> str | None:
    """Why the graph engine cannot run this training step, found without capturing anything; or None.

    >>> model = torch.nn.Linear(2, 1)
    >>> x = torch.zeros(4, 2)
    >>> print(graph_refusal(model, torch.optim.SGD(model.parameters(), lr=0.1), train_data=[x, x[:, :1]]))
    train_data is on cpu; CUDA graphs need it on a CUDA device (move the model there, pass device='cuda')
    """
    device = train_data[0].device
    if device.type != "cuda":
        return (
            f"train_data is on {device}; CUDA graphs need it on a CUDA device "
            "(move the model there, pass device='cuda')"
        )
    if not _C.WITH_CUDA:
        return (
            "this hotloop was built without CUDA (its torch had no CUDA, or nvcc was not found at build time)"
        )
    if not torch.cuda.is_available():
        return "CUDA is not available"
    wrapped = refusal_reason(model, loss_fn)  # hooks run once at capture, never at replay
    if wrapped is not None:
        return wrapped
    kind = type(optimizer)
    if kind not in _BAKED:
        return (
            f"{kind.__name__} cannot be captured (captured optimizers: torch.optim.SGD, Adam and AdamW "
            "themselves, whose fused kernels can skip a step on the device)"
        )
    reason = native_refusal(optimizer)
    if reason is not None:
        return reason
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device != device:
            return f"'{name}' is on {t.device}, but train_data is on {device}"
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.device != device:
                return f"a parameter of param group {gi} is on {p.device}, but train_data is on {device}"
            if p.requires_grad and (not p.is_floating_point() or p.is_complex()):
                return (
                    f"fused optimizers need real floating point parameters (param group {gi} has {p.dtype})"
                )
        if kind is SGD and group["momentum"] != 0 and group["dampening"] != 0:
            fresh = any(
                p.requires_grad and "momentum_buffer" not in optimizer.state.get(p, {})
                for p in group["params"]
            )
            if fresh:
                return (
                    "SGD with momentum and dampening starts its momentum buffer from the first gradient, "
                    "which a captured step cannot reproduce"
                )
    if scheduler is not None:
        return (
            "a per-step scheduler would have to run in Python between steps (use scheduler_every='event', "
            "or the native engine)"
        )
    return None


class CudaGraphEngine:
    """The whole step replayed as CUDA graphs; only on CUDA data (``engine="auto"`` tries it first there)."""

    name = "graph"
    auto_devices = ("cuda",)

    def __init__(self, warmup_steps: int = WARMUP_STEPS) -> None:
        self.warmup_steps = warmup_steps

    def refuse(self, plan: Plan) -> str | None:
        if plan.grad_clip is not None:
            return "it does not clip gradients (clip_grad_norm, clip_grad_value); the native engine does"
        if plan.accumulate > 1:
            return "it does not accumulate gradients (accumulate > 1); the native engine does"
        return graph_refusal(
            plan.model,
            plan.optimizer,
            train_data=plan.train_data,
            scheduler=plan.step_scheduler,
            loss_fn=plan.loss_fn,
        )

    def build(self, plan: Plan) -> EngineRun:
        """Captures the step; a failed capture leaves the model, the optimizer and the random generators as
        they were and raises CaptureError with the reason."""
        first = [t[: min(plan.batch_size, t.shape[0])] for t in plan.train_data]
        stateful = python_state_changes(plan.model, plan.loss_fn, first, last_label=plan.last_label)
        if stateful:
            raise CaptureError(stateful_reason(stateful))
        try:
            captured = _CapturedStep(plan, self.warmup_steps)
        except Exception as exc:  # whatever the model did under capture: the caller falls back and says why
            raise CaptureError(
                f"capturing the step into a CUDA graph failed: {type(exc).__name__}: {exc}"
            ) from exc
        return EngineRun(
            self.name, captured.step, begin_window=captured.begin_window, end_window=captured.end_window
        )


class _CapturedStep:
    """The captured graphs, their static tensors, and the window hooks that keep the user's objects true."""

    def __init__(self, plan: Plan, warmup_steps: int) -> None:
        self.model, self.optimizer, self.loss_fn = plan.model, plan.optimizer, plan.loss_fn
        self.last_label, self.metrics, self.guard = plan.last_label, plan.metric_fns, plan.guard_nonfinite
        self.device = plan.device
        self.sources = [t.contiguous() for t in plan.train_data]
        self.sizes = batch_sizes(plan.train_data[0].shape[0], plan.batch_size, plan.drop_last)
        self._allocate(plan.amp)
        self.tensors = _model_tensors(self.model, self.optimizer)
        groups = self.optimizer.param_groups
        self.params = [p for group in groups for p in group["params"] if p.requires_grad]
        self.trainable = [t for t in self.tensors if t.requires_grad]
        self.baked = [{k: copy.deepcopy(g.get(k)) for k in _BAKED[type(self.optimizer)]} for g in groups]
        self.step_forms = [_step_form(g) for g in groups for p in g["params"] if p.requires_grad]
        self.graphs = self._record(warmup_steps)
        if self.scale is not None:
            self.scale.fill_(INITIAL_SCALE)  # the warm-ups moved it
            self.growth_tracker.zero_()
        self.step = _C.GraphStep(
            self.graphs,
            [self.index[size] for size in self.sizes],
            self.sums,
            self.found_inf,
            self.guard,
            self._keep_alive(),
        )

    def _allocate(self, amp: str | None) -> None:
        """The static tensors the graphs read and write: batch buffers, index buffers, sums, flags, lrs."""
        device = self.device
        # Warm-ups gather the first samples; C++ overwrites the index buffers before every replay.
        self.index = {size: torch.arange(size, device=device) for size in self.sizes}
        self.batches = {
            size: [torch.empty((size, *t.shape[1:]), dtype=t.dtype, device=device) for t in self.sources]
            for size in self.sizes
        }
        self.sums = torch.zeros(2 + len(self.metrics), dtype=torch.float64, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.optimizer.param_groups]
        self.autocast = AMP_DTYPES.get(amp) if amp is not None else None
        self.scale = None
        if amp == "fp16":
            self.scale = torch.full((), INITIAL_SCALE, dtype=torch.float32, device=device)
            self.inv_scale = torch.ones((), dtype=torch.float32, device=device)
            self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
            self.overflow = torch.zeros((), dtype=torch.float32, device=device)  # this step's inf/NaN grads
            self.skip = torch.zeros((), dtype=torch.float32, device=device)  # the optimizer's found_inf

    def _record(self, warmup_steps: int) -> list[Any]:
        """Warm up, then capture one graph per batch size; the user's state is restored either way."""
        model, optimizer, device = self.model, self.optimizer, self.device
        saved = _Snapshot(optimizer, self.tensors, device)
        was_training = model.training
        graphs: list[Any] = []
        captured = False
        try:
            model.train()
            self._set_lrs()
            # torch.cuda.graph captures on the current device, and its default capture stream is made once
            # per process: name both, for data on any GPU
            with torch.cuda.device(device), self._capturing_optimizer():
                _to_fused_steps(optimizer, self.params, device)
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(warmup_steps):
                        for size in self.sizes:
                            optimizer.zero_grad(set_to_none=True)
                            self._train_step(size)
                torch.cuda.current_stream(device).wait_stream(side)
                optimizer.zero_grad(set_to_none=True)
                for i, size in enumerate(self.sizes):
                    graph = torch.cuda.CUDAGraph()
                    capture = torch.cuda.graph(
                        graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"
                    )
                    with capture:
                        if i > 0:
                            # the first graph's backward made the gradient tensors; later graphs add into them
                            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
                        self._train_step(size)
                    graphs.append(graph)
            torch.cuda.synchronize(device)
            # the gradient tensors the graphs write (or, for parameters no optimizer steps, add into)
            self.grads = [(p, p.grad) for p in self.trainable if p.grad is not None]
            self.state = {p: dict(optimizer.state[p]) for p in self.params if p in optimizer.state}
            captured = True
        finally:
            saved.restore(captured)
            model.train(was_training)
        return graphs

    def _keep_alive(self) -> list[torch.Tensor]:
        """Graphs address their tensors by pointer: every one that was not allocated by the capture."""
        amp_tensors = (
            [self.scale, self.inv_scale, self.growth_tracker, self.overflow, self.skip]
            if self.scale is not None
            else []
        )
        return [
            *self.sources,
            *(b for size in self.sizes for b in self.batches[size]),
            *self.lrs,
            *amp_tensors,
            *self.tensors,
            *(g for _, g in self.grads),
            *(t for s in self.state.values() for t in s.values() if torch.is_tensor(t)),
        ]

    def _train_step(self, size: int) -> None:
        batch = self.batches[size]
        for source, buffer in zip(self.sources, batch, strict=True):
            torch.index_select(source, 0, self.index[size], out=buffer)
        autocast = (
            torch.autocast("cuda", dtype=self.autocast, cache_enabled=False)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with autocast:
            pred, labels, loss = forward_and_loss(self.model, self.loss_fn, batch, self.last_label)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn must return a single-element tensor")
        values = None
        if self.metrics:
            with torch.no_grad():
                means = []
                for i, fn in enumerate(self.metrics):
                    value = fn(pred, labels) if self.last_label else fn(pred)
                    if not isinstance(value, torch.Tensor) or value.numel() != 1:
                        raise TypeError(f"train metric {i} must return a single-element tensor")
                    means.append(value.detach().reshape(()).to(torch.float64))
                values = torch.stack(means)
        _C.GraphStep.account_step(loss.detach(), values, self.sums, self.found_inf, float(size), self.guard)
        if self.scale is None:
            loss.backward()
            self.optimizer.step()
            return
        # GradScaler's step, on the device: scale, unscale, skip on inf/NaN gradients, update the scale
        (loss.float() * self.scale).backward()
        torch.reciprocal(self.scale, out=self.inv_scale)
        self.overflow.zero_()
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.overflow, self.inv_scale)
        if self.guard:
            torch.maximum(self.overflow, self.found_inf, out=self.skip)
        else:
            self.skip.copy_(self.overflow)
        self.optimizer.step()
        torch._amp_update_scale_(
            self.scale, self.growth_tracker, self.overflow, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL
        )

    @contextmanager
    def _capturing_optimizer(self) -> Iterator[None]:
        groups = self.optimizer.param_groups
        keys = ("lr", "fused", "foreach", "capturable")
        saved = [{k: g[k] for k in keys if k in g} for g in groups]
        warned = vars(self.optimizer).get("_warned_capturable_if_run_uncaptured")
        try:
            # the warm-ups run a capturable step uncaptured on purpose; torch would warn about it once
            self.optimizer._warned_capturable_if_run_uncaptured = True
            for group, lr in zip(groups, self.lrs, strict=True):
                group.update(lr=lr, fused=True, foreach=False)
                if "capturable" in group:
                    group["capturable"] = True
            # torch.optim's fused steps skip the update where found_inf is set, as GradScaler uses them
            if self.scale is not None:
                self.optimizer.found_inf = self.skip
            elif self.guard:
                self.optimizer.found_inf = self.found_inf
            yield
        finally:
            for group, before in zip(groups, saved, strict=True):
                group.update(before)
            vars(self.optimizer).pop("found_inf", None)
            if warned is None:
                vars(self.optimizer).pop("_warned_capturable_if_run_uncaptured", None)
            else:
                self.optimizer._warned_capturable_if_run_uncaptured = warned

    def _set_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            value = group["lr"]
            if isinstance(value, torch.Tensor):
                lr.copy_(value)
            else:
                lr.fill_(float(value))

    def begin_window(self, planned_steps: int) -> None:
        del planned_steps  # lr changes between windows only
        self._check_unchanged()
        self._set_lrs()
        state = self.optimizer.state
        for p, static in self.state.items():
            current = state.get(p)
            if not current:
                for t in static.values():
                    t.zero_()
            else:
                for key, t in static.items():
                    value = current.get(key)
                    if value is None:
                        t.zero_()
                    elif value is not t:
                        t.copy_(value)
            if current is None:
                state[p] = dict(static)
            else:
                current.update(static)

    def end_window(self) -> None:
        self._publish_steps()
        for p, grad in self.grads:
            p.grad = grad
        self.optimizer._opt_called = True  # what LRScheduler's wrapper around optimizer.step records

    def _publish_steps(self) -> None:
        """Adam's step counts in the form the user's optimizer keeps (CPU tensors unless fused/capturable)."""
        state = self.optimizer.state
        published = [
            (p, dtype)
            for p, dtype in zip(self.params, self.step_forms, strict=True)
            if dtype is not None and p in self.state and p in state
        ]
        if published:
            host = torch.stack([self.state[p]["step"] for p, _ in published]).cpu()  # one synchronisation
            for (p, dtype), value in zip(published, host, strict=True):
                state[p]["step"] = value.to(dtype).clone()

    def _check_unchanged(self) -> None:
        current = _model_tensors(self.model, self.optimizer)
        if [id(t) for t in current] != [id(t) for t in self.tensors]:
            raise RuntimeError(
                "the model's or optimizer's parameters or buffers were replaced since the step was captured "
                "into CUDA graphs; start a new fit() to capture it again"
            )
        for gi, (group, baked) in enumerate(zip(self.optimizer.param_groups, self.baked, strict=True)):
            for key, value in baked.items():
                if group.get(key) != value:
                    raise RuntimeError(
                        f"param_groups[{gi}][{key!r}] changed from {value} to {group.get(key)} since the "
                        "step was captured into CUDA graphs, which bake it in (only lr may change); start a "
                        "new fit() or use engine='native'"
                    )


def _model_tensors(model: nn.Module, optimizer: Optimizer) -> list[torch.Tensor]:
    """Every tensor a training step may update: parameters, buffers and the optimizer's parameters."""
    seen = {id(t): t for _, t in named_tensors(model)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    return list(seen.values())


def _step_form(group: dict[str, Any]) -> torch.dtype | None:
    """The dtype of the CPU step counts the user's Adam keeps in this group; None: it keeps device ones."""
    if "betas" not in group or group.get("capturable") or group.get("fused"):
        return None
    return scalar_dtype(False)


def _to_fused_steps(optimizer: Optimizer, params: Sequence[torch.Tensor], device: torch.device) -> None:
    """Adam's existing step counts as the float32 device tensors its fused kernel reads."""
    if type(optimizer) is SGD:
        return
    for p in params:
        state = optimizer.state.get(p)
        if state and "step" in state:
            step = state["step"]
            if not (step.device == device and step.dtype == torch.float32 and step.dim() == 0):
                state["step"] = step.detach().reshape(()).to(device=device, dtype=torch.float32, copy=True)


def _clone(value: Any) -> Any:
    if value is None:
        return None
    return value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)


class _Snapshot:
    """Values of everything the warm-up steps change, put back after capture into the user's own objects.

    After a successful capture the tensors the graphs address stay where they are (the state tensors
    in ``_CapturedStep.state``, the gradients in ``p.grad``) and take the saved values too."""

    def __init__(self, optimizer: Optimizer, tensors: Sequence[torch.Tensor], device: torch.device) -> None:
        self.optimizer = optimizer
        self.values = [(t, t.detach().clone()) for t in tensors]
        self.grads = [(p, p.grad, _clone(p.grad)) for p in tensors if p.requires_grad]
        self.state = {
            p: (s, dict(s), {k: _clone(v) for k, v in s.items()}) for p, s in optimizer.state.items()
        }
        self.opt_called = vars(optimizer).get("_opt_called")
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device)
        self.device = device

    def restore(self, captured: bool) -> None:
        torch.cuda.synchronize(self.device)
        with torch.no_grad():
            for t, value in self.values:
                t.copy_(value)
            state = self.optimizer.state
            for p in list(state):
                if p not in self.state:
                    # state the warm-ups created: its tensors start from zero, as torch.optim creates them
                    if captured:
                        for value in state[p].values():
                            if torch.is_tensor(value):
                                value.zero_()
                    del state[p]
            for p, (mapping, refs, values) in self.state.items():
                now = state.get(p, {})
                for key, value in values.items():
                    if torch.is_tensor(refs[key]):
                        refs[key].copy_(value)
                    if captured and torch.is_tensor(now.get(key)) and now[key] is not refs[key]:
                        now[key].copy_(value)
                mapping.clear()
                mapping.update(refs)
                state[p] = mapping
            for p, before, value in self.grads:
                now = p.grad
                if before is not None:
                    before.copy_(value)
                if not captured or now is None or now is before:
                    p.grad = before
                elif value is None:
                    now.zero_()  # the graphs write this tensor: it stays, as the zero gradient
                else:
                    now.copy_(value)
        if self.opt_called is None:
            vars(self.optimizer).pop("_opt_called", None)
        else:
            self.optimizer._opt_called = self.opt_called
        torch.set_rng_state(self.cpu_rng)
        torch.cuda.set_rng_state(self.cuda_rng, self.device)
        torch.cuda.synchronize(self.device)
