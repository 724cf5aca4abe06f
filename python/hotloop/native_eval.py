"""Native batched evaluation: the model's forward and the metrics traced once per batch size, run over the
batches by ``_C.Evaluator`` (no Python per batch, metric sums on the device, one sync per pass).

``capture_eval`` traces ``(params and buffers, *batch) -> (metric(model(*inputs), labels), ...)`` in eval
mode without gradients, with ``make_fx`` on fake tensors as :mod:`hotloop.op_capture` traces a training
step, lowers each graph with ``op_capture.lower`` and checks it against an eager forward on its example
batch.
:class:`NativeEvaluation` is what :func:`hotloop.evaluate` runs when given a ``batch_size``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from . import op_capture
from ._native import _C
from ._shared import CaptureError, SlowPathWarning, batch_sizes, named_tensors
from .fidelity import UserState, refusal_reason, reparametrized, stateful_reason

MetricFn = Callable[..., Any]


class _NotOneValue(ValueError):
    """A metric returned several values per batch: the user's error (raised as is), not a capture limit."""


@dataclass
class EvalGraphs:
    """A captured evaluation: graphs take ``(*tensors, *batch)``, return one 0-dim batch mean per metric."""

    names: list[str]  # parameters, then buffers, as the model names them
    tensors: list[torch.Tensor]
    graphs: dict[int, Any] = field(default_factory=dict)  # batch size -> _C.OpGraph


def model_tensors(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """The model's parameters then buffers (tied ones once), with their names: the graphs' first inputs."""
    tensors = named_tensors(model)
    return [name for name, _ in tensors], [tensor for _, tensor in tensors]


def _metrics_of(
    model: nn.Module,
    names: Sequence[str],
    metrics: Mapping[str, MetricFn],
    last_label: bool,
    tracing: list[str],
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``(tensors, *batch) -> (metric(pred, labels), ...)`` as 0-dim tensors; ``tracing`` names the metric
    being called, so a failure can say which one it was."""

    def metrics_of(tensors: list[torch.Tensor], *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bound = dict(zip(names, tensors, strict=True))
        inputs = batch[:-1] if last_label else batch
        # Forward and metrics under one reparametrisation: a metric that reads the model reads graph inputs.
        with torch.no_grad(), reparametrized(model, bound):
            pred = model(*inputs)
            args = (pred, batch[-1]) if last_label else (pred,)
            return tuple(_metric_value(key, metric, args, tracing) for key, metric in metrics.items())

    return metrics_of


def _metric_value(key: str, metric: MetricFn, args: tuple[Any, ...], tracing: list[str]) -> torch.Tensor:
    tracing.append(key)
    value = metric(*args)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise CaptureError(
            f"metric {key!r} reads tensor values in Python (.item(), float(), bool()) and returns a number, "
            "not a tensor"
        )
    if not isinstance(value, torch.Tensor):
        raise CaptureError(
            f"metric {key!r} returns a {type(value).__name__}, not a tensor (a tensor keeps it on the device)"
        )
    if value.numel() != 1:
        raise _NotOneValue(
            f"metric {key!r} must return a single-element tensor or a number per batch, got a tensor of "
            f"shape {tuple(value.shape)}"
        )
    tracing.pop()
    return value.detach().reshape(())


def _describe(exc: Exception, metric: str | None) -> str:
    where = f"metric {metric!r}" if metric is not None else "the model's forward"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    name = type(exc).__name__
    if "data-dependent" in str(exc) or "DataDependent" in name:
        return (
            f"{where} reads tensor values in Python (.item(), float(), bool()) or has data-dependent "
            f"control flow ({name}: {first_line})"
        )
    return f"tracing {where} failed ({name}: {first_line})"


def trace_eval(
    model: nn.Module,
    metrics: Mapping[str, MetricFn],
    batch: Sequence[torch.Tensor],
    *,
    last_label: bool,
) -> fx.GraphModule:
    """The forward+metrics graph on batches shaped like ``batch``, traced in eval mode without gradients.

    Placeholders are the model's parameters, then its buffers, then the batch tensors; outputs are one 0-dim
    value per metric. Raises CaptureError when it cannot be traced, ValueError when a metric returns
    several values per batch. Restores every module's mode."""
    names, tensors = model_tensors(model)
    tracing: list[str] = []
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        return make_fx(
            _metrics_of(model, names, metrics, last_label, tracing),
            tracing_mode="fake",
            _allow_non_fake_inputs=True,
        )(list(tensors), *batch)
    except _NotOneValue as exc:
        raise ValueError(str(exc)) from None
    except CaptureError:
        raise
    except Exception as exc:  # any tracing failure is a reason to fall back, reported verbatim
        raise CaptureError(_describe(exc, tracing[-1] if tracing else None)) from exc
    finally:
        for module, training in modes:
            module.training = training


def capture_eval(
    model: nn.Module,
    metrics: Mapping[str, MetricFn],
    data: Sequence[torch.Tensor],
    *,
    last_label: bool,
    batch_size: int,
) -> EvalGraphs:
    """Capture and lower one graph per batch size a pass over ``data`` visits, each checked against an eager
    forward of the model (eval mode, no gradients) on its example batch. Raises CaptureError with the reason.

    ``data`` holds the inputs, then the labels when ``last_label``; example batches are slices of it, laid out
    like the batches the evaluator will slice."""
    reason = refusal_reason(model)
    if reason is not None:
        raise CaptureError(reason)
    names, tensors = model_tensors(model)
    num_samples = data[0].shape[0]
    captured = EvalGraphs(names, tensors)
    for size in batch_sizes(num_samples, batch_size):
        start = 0 if not captured.graphs else num_samples - size
        batch = [tensor.narrow(0, start, size) for tensor in data]
        snapshot = UserState(model)
        try:
            gm = trace_eval(model, metrics, batch, last_label=last_label)
        finally:
            snapshot.restore()
        graph = op_capture.lower(
            gm, len(tensors) + len(data), protected=dict(zip(names, tensors, strict=True))
        )
        _verify(graph, captured, model, metrics, batch, last_label=last_label)
        captured.graphs[size] = graph
    return captured


def _verify(
    graph: Any,
    captured: EvalGraphs,
    model: nn.Module,
    metrics: Mapping[str, MetricFn],
    batch: Sequence[torch.Tensor],
    *,
    last_label: bool,
    rtol: float = 1e-4,
) -> None:
    """Raise CaptureError unless ``graph`` and an eager forward in eval mode give the same metrics from the
    same RNG state, or if the forward changes Python state. The model's tensors, attributes and the RNG are
    put back afterwards."""
    num_params = sum(1 for _ in model.parameters())
    devices = [d for d in {t.device for t in (*captured.tensors, *batch)} if d.type == "cuda"]

    def tensors() -> list[torch.Tensor]:
        return [t if i < num_params else t.detach().clone() for i, t in enumerate(captured.tensors)]

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            rng = torch.get_rng_state()
            cuda_rng = [torch.cuda.get_rng_state(d) for d in devices]
            inputs = batch[:-1] if last_label else batch
            snapshot = UserState(model)
            try:
                pred = model(*inputs)
                args = (pred, batch[-1]) if last_label else (pred,)
                expected = [
                    torch.as_tensor(metric(*args)).detach().reshape(()) for metric in metrics.values()
                ]
                stateful = snapshot.changes()
            finally:
                snapshot.restore()
            if stateful:
                raise CaptureError(stateful_reason(stateful, who="the forward"))
            torch.set_rng_state(rng)
            for d, s in zip(devices, cuda_rng, strict=True):
                torch.cuda.set_rng_state(s, d)
            try:
                actual = graph([*tensors(), *batch])
            except Exception as exc:
                raise CaptureError(f"the captured evaluation graph fails to run: {exc}") from exc
    finally:
        for module, training in modes:
            module.training = training
    hint = (
        "the forward or a metric behaves differently from the captured graph (Python state or data-dependent "
        "control flow that tracing froze)"
    )
    for key, value, reference in zip(metrics, actual, expected, strict=True):
        op_capture._compare(f"metric {key!r}", value, reference, rtol, hint)


def _layouts(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    return tuple(
        (name, t.shape, t.stride(), t.dtype, t.device) for name, t in zip(names, tensors, strict=True)
    )


class NativeEvaluation:
    """The batched evaluation of one ``evaluate`` stage.

    Captures at the first call (the model arrives with the event) and reuses the graphs while the model is
    the same object with the same modules and parameter/buffer names and layouts; tensors the model replaced
    by same-shaped ones (``load_state_dict(..., assign=True)``) are rebound, anything else is captured
    again. When capture fails, :meth:`__call__` returns None (the caller evaluates in Python) and the first
    failure is reported as a :class:`~hotloop.SlowPathWarning`.
    """

    def __init__(
        self,
        data: Sequence[torch.Tensor],
        metrics: Mapping[str, MetricFn],
        *,
        last_label: bool,
        batch_size: int,
    ) -> None:
        self._data = list(data)
        self._metrics = dict(metrics)
        self._last_label = last_label
        self._batch_size = batch_size
        self._model: weakref.ref[nn.Module] | None = None
        self._signature: tuple[Any, ...] | None = None
        self._tensors: list[torch.Tensor] = []
        self._evaluator: Any = None  # _C.Evaluator, or None after a failed capture
        self._warned = False

    @property
    def evaluator(self) -> Any:
        """The ``_C.Evaluator`` of the last capture (None before one, or when it failed)."""
        return self._evaluator

    def __call__(self, model: nn.Module) -> dict[str, float] | None:
        """The metrics of ``model`` over the data, or None when the graphs cannot be captured."""
        names, tensors = model_tensors(model)
        signature = (tuple((name, type(m)) for name, m in model.named_modules()), _layouts(names, tensors))
        known = self._model is not None and self._model() is model and signature == self._signature
        if not known:
            self._capture(model, signature)
        if self._evaluator is None:
            return None
        if any(now is not before for now, before in zip(tensors, self._tensors, strict=True)):
            self._evaluator.bind(tensors)
            self._tensors = tensors
        return dict(zip(self._metrics, self._evaluator.run(), strict=True))

    def _capture(self, model: nn.Module, signature: tuple[Any, ...]) -> None:
        self._model, self._signature, self._evaluator, self._tensors = None, None, None, []
        try:
            captured = capture_eval(
                model, self._metrics, self._data, last_label=self._last_label, batch_size=self._batch_size
            )
        except CaptureError as exc:
            # a model that cannot be captured is evaluated in Python until it changes (other errors, such as
            # a metric returning several values, are raised again at the next call)
            self._model, self._signature = weakref.ref(model), signature
            if not self._warned:
                self._warned = True
                keys = ", ".join(repr(key) for key in self._metrics)
                warnings.warn(
                    f"hotloop evaluates {keys} in Python, one batch at a time: {exc}",
                    SlowPathWarning,
                    stacklevel=4,
                )
            return
        self._evaluator = _C.Evaluator(
            sorted(captured.graphs.items()), captured.tensors, self._data, self._batch_size
        )
        self._model, self._signature, self._tensors = weakref.ref(model), signature, captured.tensors
