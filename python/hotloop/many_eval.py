"""Native batched evaluation of K models (``evaluate_many``): their forward and metrics traced once per batch
size as one ``vmap``-ed graph over the stacked parameters and buffers, run by ``_C.Evaluator`` over the
validation data (gathered per model once, when each model has its own subset), each metric read per model.

The graphs are checked against an eager forward of every model on the example batch; what cannot be captured
is evaluated eagerly by the caller, with one SlowPathWarning saying why.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.func import vmap
from torch.fx.experimental.proxy_tensor import make_fx

from . import op_capture
from ._native import _C
from ._shared import CaptureError, SlowPathWarning, batch_sizes
from .fidelity import UserState, refusal_reason, reparametrized, stateful_reason
from .native_eval import _describe, model_tensors

MetricFn = Callable[..., Any]


class ManyEvaluation:
    """The native pass of one ``evaluate_many`` stage over the first ``common`` samples of each model's set.

    ``index_sets`` None: every model scores ``data`` itself; else model k scores ``data[index_sets[k]]``.
    Captured at the first call and reused while the models are the same objects with the same layouts;
    their current values are copied into the stacked tensors at every call."""

    def __init__(
        self,
        data: Sequence[torch.Tensor],
        metrics: Mapping[str, MetricFn],
        *,
        index_sets: Sequence[torch.Tensor] | None,
        common: int,
        last_label: bool,
        batch_size: int,
    ) -> None:
        self._data = list(data)
        self._metrics = dict(metrics)
        self._index_sets = index_sets
        self._common = common
        self._last_label = last_label
        self._batch_size = batch_size
        self._models: list[weakref.ref[nn.Module]] = []
        self._signature: Any = None
        self._stacked: list[torch.Tensor] = []
        self._evaluator: Any = None
        self._warned = False

    @property
    def evaluator(self) -> Any:
        """The ``_C.Evaluator`` of the last capture (None before one, or when it failed)."""
        return self._evaluator

    def __call__(self, models: Sequence[nn.Module]) -> torch.Tensor | None:
        """``[metrics, K]`` sums over each model's first ``common`` samples, or None when not captured."""
        per_model = [model_tensors(m) for m in models]
        signature = (
            tuple(tuple((n, type(m)) for n, m in model.named_modules()) for model in models),
            tuple(
                tuple((n, t.shape, t.dtype, t.device) for n, t in zip(*mt, strict=True)) for mt in per_model
            ),
        )
        same = len(self._models) == len(models) and all(
            ref() is model for ref, model in zip(self._models, models, strict=True)
        )
        if not same or signature != self._signature:
            self._capture(list(models), signature)
        if self._evaluator is None:
            return None
        with torch.no_grad():
            for i, stacked in enumerate(self._stacked):
                torch.stack([tensors[i] for _, tensors in per_model], out=stacked)
        means = torch.tensor(self._evaluator.run(), dtype=torch.float64)
        return means.reshape(len(self._metrics), len(models)) * self._common

    def _capture(self, models: list[nn.Module], signature: Any) -> None:
        self._models = [weakref.ref(m) for m in models]
        self._signature, self._evaluator, self._stacked = signature, None, []
        try:
            self._evaluator, self._stacked = self._build(models)
        except CaptureError as exc:
            if not self._warned:
                self._warned = True
                keys = ", ".join(repr(key) for key in self._metrics)
                warnings.warn(
                    f"hotloop evaluates {keys} of the {len(models)} models eagerly, one by one: {exc}",
                    SlowPathWarning,
                    stacklevel=5,
                )

    def _build(self, models: list[nn.Module]) -> tuple[Any, list[torch.Tensor]]:
        for k, model in enumerate(models):
            reason = refusal_reason(model)
            if reason is not None:
                raise CaptureError(f"models[{k}]: {reason}")
        names, _ = model_tensors(models[0])
        with torch.no_grad():
            stacked = [torch.stack(ts) for ts in zip(*(model_tensors(m)[1] for m in models), strict=True)]
        shared = self._index_sets is None
        if shared:
            data = [t[: self._common] for t in self._data]
        else:
            idx = torch.stack([s[: self._common] for s in self._index_sets])  # type: ignore[union-attr]
            data = [t[idx].movedim(0, 1).contiguous() for t in self._data]  # [samples, K, ...]
        graphs = {}
        for size in batch_sizes(self._common, self._batch_size):
            start = 0 if not graphs else self._common - size
            batch = [t.narrow(0, start, size) for t in data]
            gm = self._trace(models, names, stacked, batch, shared)
            graph = op_capture.lower(gm, len(stacked) + len(batch))
            self._verify(graph, models, stacked, batch, shared)
            graphs[size] = graph
        evaluator = _C.Evaluator(sorted(graphs.items()), stacked, data, self._batch_size)
        return evaluator, stacked

    def _stacked_metrics(
        self, base: nn.Module, names: Sequence[str], shared: bool
    ) -> Callable[..., tuple[torch.Tensor, ...]]:
        """``(stacked tensors, *batch) -> (metric m of model k, ...)`` as 0-dim values, metric-major."""
        metrics, last_label = list(self._metrics.values()), self._last_label

        def one(tensors: list[torch.Tensor], *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            inputs = batch[:-1] if last_label else batch
            with reparametrized(base, dict(zip(names, tensors, strict=True))):
                pred = base(*inputs)
                args = (pred, batch[-1]) if last_label else (pred,)
                values = [metric(*args) for metric in metrics]
            for key, value in zip(self._metrics, values, strict=True):
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise CaptureError(f"metric {key!r} must return a single-element tensor per batch")
            return tuple(v.detach().reshape(()) for v in values)

        def stacked_metrics(tensors: list[torch.Tensor], *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            dims = (None if shared else 1,) * len(batch)
            per_metric = vmap(one, in_dims=(0, *dims))(tensors, *batch)
            return tuple(value for values in per_metric for value in values.unbind(0))

        return stacked_metrics

    def _trace(
        self,
        models: list[nn.Module],
        names: Sequence[str],
        stacked: list[torch.Tensor],
        batch: list[torch.Tensor],
        shared: bool,
    ) -> fx.GraphModule:
        base = models[0]
        modes = [(m, m.training) for m in base.modules()]
        snapshot = UserState(base)
        base.eval()
        try:
            with torch.no_grad():
                return make_fx(
                    self._stacked_metrics(base, names, shared),
                    tracing_mode="fake",
                    _allow_non_fake_inputs=True,
                )(stacked, *batch)
        except CaptureError:
            raise
        except Exception as exc:  # any tracing failure is a reason to evaluate eagerly, reported verbatim
            raise CaptureError(_describe(exc, None)) from exc
        finally:
            snapshot.restore()
            for module, training in modes:
                module.training = training

    def _verify(
        self,
        graph: Any,
        models: list[nn.Module],
        stacked: list[torch.Tensor],
        batch: list[torch.Tensor],
        shared: bool,
        rtol: float = 1e-4,
    ) -> None:
        """Each model's eager forward (eval mode, no gradients) on its example batch against the graph."""
        try:
            actual = graph([*stacked, *batch])
        except Exception as exc:
            raise CaptureError(f"the captured evaluation graph fails to run: {exc}") from exc
        K = len(models)
        hint = "the forward or a metric behaves differently from the captured stacked graph"
        for k, model in enumerate(models):
            own = batch if shared else [t.select(1, k) for t in batch]
            inputs = own[:-1] if self._last_label else own
            modes = [(m, m.training) for m in model.modules()]
            snapshot = UserState(model)
            model.eval()
            try:
                with torch.no_grad():
                    pred = model(*inputs)
                    args = (pred, own[-1]) if self._last_label else (pred,)
                    expected = [
                        torch.as_tensor(metric(*args)).reshape(()) for metric in self._metrics.values()
                    ]
                changed = snapshot.changes()
            finally:
                snapshot.restore()
                for module, training in modes:
                    module.training = training
            if changed:
                raise CaptureError(f"models[{k}]: {stateful_reason(changed, who='the forward')}")
            for m, (key, reference) in enumerate(zip(self._metrics, expected, strict=True)):
                op_capture._compare(f"models[{k}]'s metric {key!r}", actual[m * K + k], reference, rtol, hint)
