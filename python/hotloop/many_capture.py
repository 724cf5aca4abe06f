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
from torch import fx, nn
from torch.func import grad_and_value, vmap
from torch.fx.experimental.proxy_tensor import make_fx

from ._shared import CaptureError, forward_and_loss, named_tensors, traced_scalar_loss
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
            extra = sorted(set(mine) - {e[0] for e in first_tensors})
            return f"models[{k}] has tensors models[0] has not ({extra})"
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
            current = _own_tensors(model)
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


def _own_tensors(model: nn.Module) -> list[Any]:
    """Every parameter and buffer slot of the module tree, in a fixed order (a cheap identity check)."""
    out: list[Any] = []
    pending = [model]
    while pending:
        module = pending.pop()
        out.extend(module._parameters.values())
        out.extend(module._buffers.values())
        pending.extend(module._modules.values())
    return out


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
        return traced_scalar_loss(loss), (pred.detach(), labels) if metrics else ()

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


class TrainStep:
    """The step's graphs and their inputs, in order.

    ``graphs[B]`` (one per batch size) takes ``[flat, *state, *data, idx, on, loss_sum, samples, steps,
    *metric_sums]``: it gathers each model's batch (``idx``: ``[B]`` shared or ``[K, B]``), runs the vmap'd
    joint forward+backward, adds the rows in ``on & isfinite(loss)`` (``on`` alone without the guard) to
    the window's sums and returns ``(flat gradient [K, P], isfinite(loss) [K])``. ``update_all`` takes
    ``[flat, grad, last_grad, *optimizer.fast_tensors()]`` and updates every row; ``update_rows`` takes
    ``[flat, grad, rows, last_grad, *optimizer.tensors()]`` and updates the rows in ``rows`` only.
    """

    def __init__(
        self, stacked: StackedModels, data: Sequence[torch.Tensor], optimizer: Any, num_metrics: int
    ):
        K = stacked.K
        self.optimizer = optimizer
        self.loss_sum = torch.zeros(K, dtype=torch.float64)
        self.samples = torch.zeros(K, dtype=torch.int64)
        self.steps = torch.zeros(K, dtype=torch.int64)
        self.last_grad = torch.zeros_like(stacked.flat)  # each model's gradient of its last applied step
        self.metric_sums = [torch.zeros(K, dtype=torch.float64) for _ in range(num_metrics)]
        self.inputs: list[torch.Tensor] = [
            stacked.flat,
            *stacked.state,
            *data,
            torch.zeros(0, dtype=torch.int64),
            torch.ones(K, 1, dtype=torch.bool),
            self.loss_sum,
            self.samples,
            self.steps,
            *self.metric_sums,
        ]
        self.idx_slot = 1 + len(stacked.state) + len(data)
        self.on_slot = self.idx_slot + 1
        self.all_inputs = [stacked.flat, stacked.flat, self.last_grad, *optimizer.fast_tensors()]
        self.rows_inputs = [stacked.flat, stacked.flat, torch.ones(K, 1, dtype=torch.bool), self.last_grad]
        self.rows_inputs += optimizer.tensors()
        self.update_all: Any = None
        self.update_rows: Any = None
        self.updates: dict[Any, tuple[Any, Any]] = {}  # optimizer.use_wd -> (update_all, update_rows)

    def select_updates(self) -> None:
        """The update graphs for the optimizer's current options (captured the first time they are seen:
        the weight decay ops are left out while no model decays)."""
        key = self.optimizer.use_wd
        if key not in self.updates:
            capture_updates(self)
            self.updates[key] = (self.update_all, self.update_rows)
        self.update_all, self.update_rows = self.updates[key]

    def reset_sums(self) -> None:
        for t in (self.loss_sum, self.samples, self.steps, *self.metric_sums):
            t.zero_()


def _trace(fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    try:
        return make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(_describe_trace_failure(exc)) from exc


def capture_updates(train: TrainStep) -> None:
    """The two update graphs (they do not depend on the batch)."""
    optimizer = train.optimizer

    def update_all(flat, grad, last_grad, *tensors):
        optimizer.update_all(flat, grad, tensors)
        last_grad.copy_(grad)
        return ()

    def update_rows(flat, grad, rows, last_grad, *tensors):
        optimizer.update(flat, grad, rows, tensors)
        last_grad.copy_(torch.where(rows, grad, last_grad))
        return ()

    grad = torch.zeros_like(train.last_grad)
    for name, fn, inputs in (
        ("update_all", update_all, train.all_inputs),
        ("update_rows", update_rows, train.rows_inputs),
    ):
        inputs = [inputs[0], grad, *inputs[2:]]
        setattr(train, name, lower(_trace(fn, inputs), len(inputs)))


def capture(
    models: Sequence[nn.Module],
    stacked: StackedModels,
    train: TrainStep,
    loss_fn: Callable[..., torch.Tensor],
    example_indices: Sequence[torch.Tensor],
    *,
    last_label: bool,
    per_model_batch: bool,
    guard: bool,
    metrics: Sequence[Callable[..., Any]] = (),
) -> None:
    """Capture, lower and check one step graph per index tensor in ``example_indices`` (one per batch size:
    ``[B]`` shared by all models, or ``[K, B]`` with ``per_model_batch``) into ``stacked.graphs``, and the
    update graphs. Raises CaptureError with the reason."""
    for k, model in enumerate(models):
        reason = refusal_reason(model, loss_fn)
        if reason is not None:
            raise CaptureError(f"models[{k}]: {reason}")
    model = models[0]
    protected: dict[str, torch.Tensor] = {}
    for k in range(len(models)):
        names = stacked.train_names + stacked.state_names
        for name, t in zip(names, stacked.user_train[k] + stacked.user_state[k], strict=True):
            protected[f"models[{k}].{name}"] = t
    K, n_state = stacked.K, len(stacked.state)
    num_data = train.idx_slot - 1 - n_state
    shapes = [t.shape[1:] for t in stacked.train]
    for idx in example_indices:
        size = idx.shape[-1]
        if size in stacked.graphs:
            continue
        joint = _stacked_step(model, loss_fn, last_label, stacked, metrics, per_model_batch, num_data)

        def step(*inputs: torch.Tensor, joint: Callable[..., Any] = joint, size: int = size) -> Any:
            flat, state = inputs[0], list(inputs[1 : 1 + n_state])
            data = inputs[1 + n_state : 1 + n_state + num_data]
            index, on, loss_sum, samples, steps = inputs[train.idx_slot : train.idx_slot + 5]
            metric_sums = inputs[train.idx_slot + 5 :]
            params = [
                flat[:, a:b].view(K, *shape) for (a, b), shape in zip(stacked.offsets, shapes, strict=True)
            ]
            batch = [t[index] if per_model_batch else t.index_select(0, index) for t in data]
            # the forward updates every model's buffers (BatchNorm's running statistics): a model that sits
            # the step out (frozen, or out of batches) gets its own back, as its plain loop runs no forward
            before = [s.clone() for s in state]
            outputs = joint(params, state, *batch)
            for s, old in zip(state, before, strict=True):
                s.copy_(torch.where(on.reshape(K, *([1] * (s.dim() - 1))), s, old))
            n = len(params)
            losses = outputs[n]
            grad = torch.cat([g.reshape(K, -1) for g in outputs[:n]], dim=1)
            finite = torch.isfinite(losses)
            taken = on.reshape(K) & finite if guard else on.reshape(K)
            zero = torch.zeros_like(loss_sum)
            loss_sum.add_(torch.where(taken, losses.to(loss_sum.dtype) * size, zero))
            for sums, values in zip(metric_sums, outputs[n + 1 :], strict=True):
                sums.add_(torch.where(taken, values.to(sums.dtype) * size, zero))
            samples.add_(taken.to(samples.dtype) * size)
            steps.add_(taken.to(steps.dtype))
            return grad, finite

        inputs = list(train.inputs)
        inputs[train.idx_slot] = idx
        snapshot = UserState(model, loss_fn)
        was_training = model.training
        model.train()
        try:
            gm = _trace(step, inputs)
        finally:
            model.train(was_training)
            snapshot.restore()
        graph = lower(gm, len(inputs), protected=protected)
        _verify(graph, models, stacked, train, inputs, loss_fn, last_label, per_model_batch, num_data)
        stacked.graphs[size] = graph
    train.select_updates()


def _verify(
    graph: Any,
    models: Sequence[nn.Module],
    stacked: StackedModels,
    train: TrainStep,
    inputs: list[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    last_label: bool,
    per_model_batch: bool,
    num_data: int,
    rtol: float = 1e-4,
) -> None:
    """One step of the graph, on copies of everything it writes, against K eager autograd steps of the
    user's own models on their batches (the models put back): losses, gradients, buffer updates."""
    n_state = len(stacked.state)
    data_slots = range(1 + n_state, 1 + n_state + num_data)
    copies = [t if i in data_slots else t.clone() for i, t in enumerate(inputs)]
    idx = inputs[train.idx_slot]
    copies[train.on_slot] = torch.ones_like(inputs[train.on_slot])
    for slot in range(train.idx_slot + 2, len(copies)):
        copies[slot].zero_()
    try:
        last_grad, _ = graph(copies)
    except Exception as exc:
        raise CaptureError(f"the captured stacked graph fails to run: {exc}") from exc
    size = idx.shape[-1]
    losses = copies[train.idx_slot + 2] / size
    state = copies[1 : 1 + n_state]
    data = inputs[1 + n_state : 1 + n_state + num_data]
    hint = "forward or loss_fn behaves differently from the captured stacked graph"
    for k, model in enumerate(models):
        own = [t[idx[k] if per_model_batch else idx].clone() for t in data]
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
        if not bool(torch.isfinite(loss)):
            continue  # nothing to compare: the guard leaves such a step out
        _compare(f"models[{k}]'s loss", losses[k].to(loss.dtype), loss.detach().reshape(()), rtol, hint)
        floor = max((_scale(g) for g in grads if g is not None), default=0.0) * 1e-6
        for name, ref, (a, b) in zip(stacked.train_names, grads, stacked.offsets, strict=True):
            if ref is None:
                raise CaptureError(f"parameter '{name}' gets no gradient from the loss")
            value = last_grad[k, a:b].view(ref.shape)
            _compare(f"models[{k}]'s gradient of '{name}'", value, ref, rtol, hint, floor=floor)
        for name, value, ref in zip(stacked.state_names, state, buffers, strict=True):
            _compare(f"models[{k}]'s buffer '{name}' after the step", value[k], ref, rtol, hint)
