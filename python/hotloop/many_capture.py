"""fit_many's capture: K models of one architecture stacked along a leading dimension, their training step
traced as ``make_fx(vmap(grad_and_value(functional_call)))`` and lowered by ``op_capture.lower`` to a
``_C.OpGraph``, checked against K eager steps of the user's own models before anyone trains with it.

The trainable parameters live in one flat ``[K, P]`` tensor (each stacked parameter a view of its
columns) so the optimizer updates every model in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value, vmap
from torch.fx.experimental.proxy_tensor import make_fx

from ._shared import CaptureError, forward_and_loss, named_tensors
from .fidelity import UserState, refusal_reason, reparametrized, stateful_reason
from .op_capture import _compare, _describe_trace_failure, _scale, _split_parameters, lower


def architecture_reason(models: Sequence[nn.Module]) -> str | None:
    """Why these models are not K copies of one architecture (names, shapes, dtypes, devices, module
    types, trainable flags), or None."""
    first = models[0]
    first_tensors = [(n, t.shape, t.dtype, t.device, t.requires_grad) for n, t in named_tensors(first)]
    first_modules = [(n, type(m)) for n, m in first.named_modules()]
    for k, model in enumerate(models[1:], start=1):
        if [(n, type(m)) for n, m in model.named_modules()] != first_modules:
            return f"models[{k}] has other submodules than models[0] (a different architecture)"
        tensors = [(n, t.shape, t.dtype, t.device, t.requires_grad) for n, t in named_tensors(model)]
        if tensors != first_tensors:
            mine = {entry[0]: entry for entry in tensors}
            for entry in first_tensors:
                other = mine.get(entry[0])
                if other != entry:
                    what = (
                        "is missing"
                        if other is None
                        else f"is {tuple(other[1])} {other[2]} on {other[3]} (requires_grad={other[4]})"
                    )
                    return (
                        f"models[{k}]'s '{entry[0]}' {what}, but models[0]'s is {tuple(entry[1])} {entry[2]} "
                        f"on {entry[3]} (requires_grad={entry[4]})"
                    )
            return f"models[{k}] has tensors models[0] has not ({sorted(set(mine) - {e[0] for e in first_tensors})})"
    for k, model in enumerate(models):
        if any(model is other for other in models[:k]):
            return f"models[{k}] is the same object as an earlier model"
    return None


@dataclass
class StackedModels:
    """The K models' tensors stacked: trainable ones as views of ``flat`` ``[K, P]``, the rest stacked."""

    train_names: list[str]
    state_names: list[str]
    flat: torch.Tensor
    offsets: list[tuple[int, int]]
    train: list[torch.Tensor]  # [K, *shape] views of flat
    state: list[torch.Tensor]  # [K, *shape]
    user_train: list[list[torch.Tensor]]  # [k][i]: model k's parameter i
    user_state: list[list[torch.Tensor]]
    graphs: dict[int, Any] = field(default_factory=dict)
    rows: list[list[torch.Tensor]] = field(default_factory=list)  # [i][k]: model k's row of tensor i
    seen: list[list[torch.Tensor]] = field(default_factory=list)  # [k]: model k's tensors at the last check

    def __post_init__(self) -> None:
        self.rows = [list(t.unbind(0)) for t in (*self.train, *self.state)]

    @property
    def K(self) -> int:
        return self.flat.shape[0]

    def bind(self) -> None:
        """Makes every user tensor a view of its row of the stacked storage (its ``.data`` swapped, the
        object kept), first copying in the values of any tensor that is not such a view (at the start, or
        replaced or loaded by the user between events). The stacked step then trains the user's tensors
        themselves: nothing is copied back."""
        with torch.no_grad():
            for i, users in enumerate(self._users()):
                rows = self.rows[i]
                for k, own in enumerate(users):
                    if own.data_ptr() != rows[k].data_ptr():
                        rows[k].copy_(own)
                        own.data = rows[k]

    def unbind(self) -> None:
        """Gives every user tensor its own storage again (the stream ended)."""
        with torch.no_grad():
            for i, users in enumerate(self._users()):
                for k, own in enumerate(users):
                    if own.data_ptr() == self.rows[i][k].data_ptr():
                        own.data = own.data.clone()

    def _users(self) -> list[list[torch.Tensor]]:
        """[i][k]: model k's tensor i, in the order of ``rows``."""
        n = len(self.train)
        return [
            [(self.user_train[k][i] if i < n else self.user_state[k][i - n]) for k in range(self.K)]
            for i in range(n + len(self.state))
        ]

    def check_unchanged(self, models: Sequence[nn.Module]) -> None:
        """Follow tensors the user replaced (``module.weight = ...``); raise CaptureError if one has another
        layout than at capture."""
        for k, model in enumerate(models):
            current = [*model.parameters(), *model.buffers()]
            seen = self.seen[k] if k < len(self.seen) else []
            if len(current) == len(seen) and all(a is b for a, b in zip(current, seen, strict=True)):
                continue
            names, train, state_names, state = _split_parameters(model)
            if names != self.train_names or state_names != self.state_names:
                raise CaptureError(f"models[{k}]'s trainable parameters or buffers changed since capture")
            for old, new in zip(self.user_train[k] + self.user_state[k], train + state, strict=True):
                if (old.shape, old.dtype, old.device) != (new.shape, new.dtype, new.device):
                    raise CaptureError(
                        f"a tensor of models[{k}] changed shape, dtype or device since capture"
                    )
            self.user_train[k], self.user_state[k] = train, state
            while len(self.seen) <= k:
                self.seen.append([])
            self.seen[k] = current


def stack(models: Sequence[nn.Module]) -> StackedModels:
    splits = [_split_parameters(m) for m in models]
    train_names, first_train, state_names, _ = splits[0]
    if not first_train:
        raise CaptureError("the models have no trainable parameters")
    dtypes = {t.dtype for t in first_train}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise CaptureError("the trainable parameters must share one floating dtype to be stacked")
    K = len(models)
    offsets, start = [], 0
    for t in first_train:
        offsets.append((start, start + t.numel()))
        start += t.numel()
    flat = torch.empty(K, start, dtype=first_train[0].dtype, device=first_train[0].device)
    train = [flat[:, a:b].view(K, *t.shape) for (a, b), t in zip(offsets, first_train, strict=True)]
    state = [torch.stack([s[3][i].detach() for s in splits]) for i in range(len(state_names))]
    stacked = StackedModels(
        train_names,
        state_names,
        flat,
        offsets,
        train,
        state,
        [list(s[1]) for s in splits],
        [list(s[3]) for s in splits],
    )
    stacked.bind()
    return stacked


def _stacked_step(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    last_label: bool,
    stacked: StackedModels,
    metrics: Sequence[Callable[..., Any]],
    per_model_batch: bool,
    num_batch: int,
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``(train, state, *batch) -> (*grads, losses, *metrics)``, every output with a leading K."""
    train_names, state_names = stacked.train_names, stacked.state_names

    def loss_of(params, state, batch):
        tensors = dict(zip(train_names, params, strict=True))
        tensors.update(zip(state_names, state, strict=True))
        with reparametrized(model, tensors):
            pred, labels, loss = forward_and_loss(model, loss_fn, batch, last_label)
        if not isinstance(loss, torch.Tensor):
            raise CaptureError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise CaptureError(f"loss_fn must return a single value, got shape {tuple(loss.shape)}")
        return loss.reshape(()), (pred.detach(), labels) if metrics else ()

    def one(params, state, *batch):
        grads, (loss, aux) = grad_and_value(loss_of, has_aux=True)(params, state, batch)
        values = []
        for i, metric in enumerate(metrics):
            value = metric(*aux) if last_label else metric(aux[0])
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise CaptureError(f"train metric {i} must return a single-element tensor")
            values.append(value.detach().reshape(()).to(loss.dtype))
        return (*grads, loss, *values)

    batch_dims = (0 if per_model_batch else None,) * num_batch
    return vmap(one, in_dims=(0, 0, *batch_dims))


def capture(
    models: Sequence[nn.Module],
    stacked: StackedModels,
    loss_fn: Callable[..., torch.Tensor],
    batches: Sequence[Sequence[torch.Tensor]],
    *,
    last_label: bool,
    per_model_batch: bool,
    metrics: Sequence[Callable[..., Any]] = (),
) -> None:
    """Capture, lower and check one stacked graph per batch in ``batches`` (real batches: ``[B, ...]``
    shared by all models, or ``[K, B, ...]`` with ``per_model_batch``) into ``stacked.graphs``. Raises
    CaptureError with the reason."""
    for k, model in enumerate(models):
        reason = refusal_reason(model, loss_fn)
        if reason is not None:
            raise CaptureError(f"models[{k}]: {reason}")
    model = models[0]
    protected: dict[str, torch.Tensor] = {}
    for k in range(len(models)):
        for name, t in zip(
            stacked.train_names + stacked.state_names, stacked.user_train[k] + stacked.user_state[k]
        ):
            protected[f"models[{k}].{name}"] = t
    num_batch = len(batches[0])
    num_inputs = len(stacked.train) + len(stacked.state) + num_batch
    for batch in batches:
        size = batch[0].shape[1 if per_model_batch else 0]
        if size in stacked.graphs:
            continue
        step = _stacked_step(model, loss_fn, last_label, stacked, metrics, per_model_batch, num_batch)
        snapshot = UserState(model, loss_fn)
        was_training = model.training
        model.train()
        try:
            gm = make_fx(
                lambda train, state, *b: step(train, state, *b),
                tracing_mode="fake",
                _allow_non_fake_inputs=True,
            )(list(stacked.train), list(stacked.state), *batch)
        except CaptureError:
            raise
        except Exception as exc:
            raise CaptureError(_describe_trace_failure(exc)) from exc
        finally:
            model.train(was_training)
            snapshot.restore()
        graph = lower(gm, num_inputs, protected=protected)
        _verify(graph, models, stacked, loss_fn, batch, last_label, per_model_batch, len(metrics))
        stacked.graphs[size] = graph


def _verify(
    graph: Any,
    models: Sequence[nn.Module],
    stacked: StackedModels,
    loss_fn: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
    last_label: bool,
    per_model_batch: bool,
    num_metrics: int,
    rtol: float = 1e-4,
) -> None:
    """The stacked graph against K eager autograd steps of the user's own models (then put back)."""
    state = [t.clone() for t in stacked.state]
    train = [t.detach().clone() for t in stacked.train]
    try:
        outputs = graph(train + state + [t.clone() for t in batch])
    except Exception as exc:
        raise CaptureError(f"the captured stacked graph fails to run: {exc}") from exc
    n = len(stacked.train)
    if len(outputs) != n + 1 + num_metrics:
        raise CaptureError(f"the stacked graph returns {len(outputs)} values, expected {n + 1 + num_metrics}")
    hint = "forward or loss_fn behaves differently from the captured stacked graph"
    for k, model in enumerate(models):
        own = [t[k].clone() for t in batch] if per_model_batch else [t.clone() for t in batch]
        snapshot = UserState(model, loss_fn)
        params = stacked.user_train[k]
        was_training = model.training
        try:
            model.train()
            for p in params:
                p.grad = None
            with torch.enable_grad():
                _, _, loss = forward_and_loss(model, loss_fn, own, last_label)
                loss.backward()
            grads = [p.grad.detach().clone() if p.grad is not None else None for p in params]
            buffers = [t.detach().clone() for t in stacked.user_state[k]]
            changed = snapshot.changes()
        finally:
            model.train(was_training)
            snapshot.restore()
        if changed:
            raise CaptureError(stateful_reason(changed))
        _compare(f"models[{k}]'s loss", outputs[n][k], loss.detach().reshape(()), rtol, hint)
        floor = max((_scale(g) for g in grads if g is not None), default=0.0) * 1e-6
        for name, value, ref in zip(stacked.train_names, outputs[:n], grads, strict=True):
            if ref is None:
                raise CaptureError(f"parameter '{name}' gets no gradient from the loss")
            _compare(f"models[{k}]'s gradient of '{name}'", value[k], ref, rtol, hint, floor=floor)
        for name, value, ref in zip(stacked.state_names, state, buffers, strict=True):
            _compare(f"models[{k}]'s buffer '{name}' after the step", value[k], ref, rtol, hint)
