"""fit_many(): K models of one architecture trained in one stacked loop (seeds, sweeps, ensembles,
cross-validation), with events carrying per-model values as lists of K.

The stacked path captures one ``vmap``-ed joint graph per batch size (``many_capture``) and updates all
models in one pass over flat ``[K, P]`` tensors (``many_optim``); the C++ ``Loop`` runs a window's steps
through a ``_C.ManyStep`` with the GIL released, Python only planning each run's batch indices between runs.
What cannot be stacked falls back to K ``fit`` runs in lock-step, with a SlowPathWarning saying why.
"""

from __future__ import annotations

import copy
import operator
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _checks as check
from ._native import _C
from ._shared import CaptureError, SlowPathWarning, enter_window, leave_window
from .events import Event
from .fit import FitStream, NonFiniteLossError, _interrupt_at_step_boundary, fit
from .many_capture import StackedModels, TrainStep, architecture_reason, capture, stack
from .many_optim import StackedOptimizer
from .many_optim import refusal_reason as optimizer_reason

STATE_VERSION = 1
ORDERS = ("shared", "independent")
ON_NONFINITE = ("freeze", "raise", "continue")
# With every=N the C++ loop runs the window in runs of about this many steps (whole epochs when longer), so
# a long window's batch indices are never all built at once; Python plans the next run in between.
_RUN_STEPS = 2048


class ModelList(list):  # type: ignore[type-arg]
    """``event["model"]`` of :func:`fit_many`: the K models, plus ``freeze(k)`` (model k takes no further
    steps; the stream ends when every model is frozen) and ``active`` (which models still train)."""

    def __init__(self, models: Sequence[nn.Module], session: Any) -> None:
        super().__init__(models)
        self._session = session

    def freeze(self, k: int) -> None:
        self._session.freeze(k)

    @property
    def active(self) -> list[bool]:
        return list(self._session.active)


class ManyStream(FitStream):
    """The event stream returned by :func:`fit_many`: ``close()`` (the models' and optimizers' tensors get
    their own storage back) and ``state_dict()`` as for ``fit``, plus ``freeze(k)``."""

    def freeze(self, k: int) -> None:
        """Model ``k`` takes no further steps (its weights and optimizer state stay as they are)."""
        if not self._holder:
            raise RuntimeError("freeze() needs at least one event: the stream has not started")
        self._holder[0].freeze(k)


def kfold(
    n: int, k: int, generator: torch.Generator | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(train_subsets, val_subsets)`` of a k-fold split of ``n`` samples: the folds of
    ``torch.randperm(n, generator=generator).tensor_split(k)`` (sizes differ by at most one), each sorted;
    ``train_subsets[i]`` is every sample outside fold ``i``. Pass ``subsets=train_subsets`` to
    :func:`fit_many` and the ``val_subsets`` to :func:`validation_loss_many`.

    >>> train, val = kfold(10, 5, torch.Generator().manual_seed(0))
    >>> [len(t) for t in train], [len(v) for v in val], sorted(torch.cat(val).tolist()) == list(range(10))
    ([8, 8, 8, 8, 8], [2, 2, 2, 2, 2], True)
    """
    check.check_int("n", n, minimum=1)
    check.check_int("k", k, minimum=2)
    if k > n:
        raise ValueError(f"k={k} folds need at least k samples, got n={n}")
    folds = [f.sort().values for f in torch.randperm(n, generator=generator).tensor_split(k)]
    train = [torch.cat([f for j, f in enumerate(folds) if j != i]).sort().values for i in range(k)]
    return train, folds


def fit_many(
    train_data: Sequence[torch.Tensor],
    models: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    loss_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int = 1,
    order: str = "shared",
    generator: torch.Generator | Sequence[torch.Generator] | int | None = None,
    subsets: Sequence[torch.Tensor] | None = None,
    shuffle: bool = True,
    last_label: bool = True,
    extra: Mapping[str, Any] | None = None,
    step_offset: int = 0,
    every: int | None = None,
    drop_last: bool = False,
    engine: str = "auto",
    metrics: Mapping[str, str | Callable[..., Any]] | None = None,
    on_nonfinite: str = "freeze",
    resume: Mapping[str, Any] | None = None,
) -> ManyStream:
    """Train K models of one architecture together, yielding an :class:`Event` per epoch (or every
    ``every`` steps) whose per-model values are lists of K.

    Each model trains exactly as its own plain loop would (forward, loss, ``zero_grad``, ``backward``,
    ``step``) on its own batches; the K steps run as one stacked graph and one fused optimizer pass.

    Args:
        train_data: Tensors sharing their first (sample) dimension, as for :func:`fit`.
        models: K modules of one architecture (same submodules, parameter and buffer names, shapes,
            dtypes, devices); they stay the truth: at every event model k holds its trained weights.
        models, optimizers: ``optimizers[k]`` steps exactly ``models[k]``'s trainable parameters; all of
            one class (SGD, Adam or AdamW are stacked); lr, weight decay, betas, eps, momentum and
            dampening may differ per model. ``optimizers[k].state_dict()`` is model k's own at every event.
        loss_fn: ``loss_fn(pred, labels)`` (``loss_fn(pred)`` without labels), the batch's mean loss.
        batch_size: Samples per optimizer step.
        order: ``"shared"``: every model sees the same batches, the epoch order drawn from ``generator``
            (one ``torch.Generator`` or None for the default one). ``"independent"``: model k's epoch
            order is ``torch.randperm(n, generator=generator[k])``; ``generator`` is a list of K
            generators, or an int seed (model k then uses ``torch.Generator().manual_seed(seed + k)``).
        subsets: K index tensors: model k trains only on ``train_data[subsets[k]]`` (bootstrap bags,
            :func:`kfold`'s training folds), exactly as ``fit`` on those samples would. With
            ``order="shared"`` each model draws its epoch order from a copy of the same generator state.
        shuffle, last_label, extra, step_offset, every, drop_last: As for :func:`fit`; ``every`` counts
            stacked steps.
        engine: ``"auto"`` (stacked, else K sequential ``fit`` runs with a SlowPathWarning saying why),
            ``"stacked"`` (raise instead of falling back) or ``"sequential"``.
        metrics: Train metrics as for :func:`fit`, reported per model.
        on_nonfinite: A model whose loss is not finite: ``"freeze"`` (default) leaves that step unapplied
            and freezes the model alone, the others train on; ``"raise"`` raises
            :class:`NonFiniteLossError`; ``"continue"`` applies it as a plain loop would.
        resume: A :meth:`ManyStream.state_dict` to continue from.

    Events carry ``model`` (a :class:`ModelList`), ``step``, ``train_loss`` (list), ``train_time_sec``,
    ``epoch``, ``updates`` (list), ``samples_per_sec`` (all models), ``engine``, ``lr`` (list), each
    metric (list), ``active`` (list of bool) and, in the window where a model froze on a non-finite loss,
    ``nonfinite_step`` (list, None for the others). K=1 runs :func:`fit`'s own path.
    """
    options = dict(
        batch_size=batch_size,
        order=order,
        generator=generator,
        subsets=subsets,
        shuffle=shuffle,
        last_label=last_label,
        extra=extra,
        step_offset=step_offset,
        every=every,
        drop_last=drop_last,
        engine=engine,
        metrics=metrics,
        on_nonfinite=on_nonfinite,
        resume=resume,
    )
    return ManyStream(lambda: _start(train_data, models, optimizers, loss_fn, options))


def _start(train_data: Any, models: Any, optimizers: Any, loss_fn: Any, options: dict[str, Any]) -> Any:
    plan = _plan(train_data, models, optimizers, loss_fn, options)
    if plan.engine == "sequential" or plan.K == 1:
        return _Sequential(plan)
    reason = _stack_reason(plan)
    stacked = None
    if reason is None:
        try:
            stacked = _Stacked(plan)
        except CaptureError as exc:
            reason = str(exc)
    if stacked is not None:
        return stacked
    if plan.engine == "stacked":
        raise CaptureError(f"fit_many cannot stack these models: {reason}")
    warnings.warn(
        f"fit_many runs the {plan.K} models as {plan.K} sequential fit() runs: {reason}",
        SlowPathWarning,
        stacklevel=4,
    )
    return _Sequential(plan)


class _Plan:
    """The checked arguments of one fit_many call."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def _plan(train_data: Any, models: Any, optimizers: Any, loss_fn: Any, options: dict[str, Any]) -> _Plan:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or not models:
        raise TypeError("models must be a non-empty list of torch.nn.Module")
    models = list(models)
    for k, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{k}] must be a torch.nn.Module, got {type(model).__name__}")
    K = len(models)
    if not isinstance(optimizers, Sequence) or len(optimizers) != K:
        raise ValueError(f"optimizers must be a list of {K} optimizers, one per model")
    optimizers = list(optimizers)
    for k, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
        check.check_optimizer(optimizer, model)
        if any(optimizer is other for other in optimizers[:k]):
            raise ValueError(f"optimizers[{k}] is the same object as an earlier optimizer")
    check.check_callable("loss_fn", loss_fn)
    last_label = check.check_bool("last_label", options["last_label"])
    tensors = check.check_tensors("train_data", train_data, last_label=last_label)
    devices = {check.model_device(m) for m in models}
    if len(devices) != 1:
        raise ValueError(f"the models are on different devices ({sorted(map(str, devices))})")
    device = devices.pop()
    tensors = check.place_on_device(tensors, device)
    n = tensors[0].shape[0]
    batch_size = check.check_int("batch_size", options["batch_size"], minimum=1)
    order = check.check_choice("order", options["order"], ORDERS)
    engine = check.check_choice("engine", options["engine"], ("auto", "stacked", "sequential"))
    on_nonfinite = check.check_choice("on_nonfinite", options["on_nonfinite"], ON_NONFINITE)
    every = options["every"]
    if every is not None:
        every = check.check_int("every", every, minimum=1)
    subsets = options["subsets"]
    if subsets is not None:
        if not isinstance(subsets, Sequence) or len(subsets) != K:
            raise ValueError(f"subsets must be a list of {K} index tensors, one per model")
        checked = []
        for k, idx in enumerate(subsets):
            idx = torch.as_tensor(idx)
            if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32) or idx.numel() == 0:
                raise ValueError(f"subsets[{k}] must be a non-empty 1-D integer tensor")
            if int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(f"subsets[{k}] has indices outside [0, {n})")
            checked.append(idx.to(torch.int64).cpu())
        subsets = checked
    generator = options["generator"]
    if order == "shared":
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("with order='shared', generator must be one torch.Generator or None")
        generators = [generator]
    else:
        if generator is None:
            generator = int(torch.randint(2**62, ()).item())
        if isinstance(generator, int) and not isinstance(generator, bool):
            generators = [torch.Generator().manual_seed(generator + k) for k in range(K)]
        elif isinstance(generator, Sequence) and len(generator) == K:
            generators = list(generator)
            if not all(isinstance(g, torch.Generator) for g in generators):
                raise TypeError("generator must hold torch.Generator objects")
        else:
            raise TypeError(f"with order='independent', generator must be a list of {K} generators or an int")
    metric_fns = check.check_metrics(options["metrics"], last_label=last_label)
    extra = dict(options["extra"] or {})
    return _Plan(
        train_data=tensors,
        models=models,
        optimizers=optimizers,
        loss_fn=loss_fn,
        K=K,
        n=n,
        batch_size=batch_size,
        order=order,
        generators=generators,
        subsets=subsets,
        shuffle=check.check_bool("shuffle", options["shuffle"]),
        last_label=last_label,
        extra=extra,
        step_offset=check.check_int("step_offset", options["step_offset"]),
        every=every,
        drop_last=check.check_bool("drop_last", options["drop_last"]),
        engine=engine,
        metrics=metric_fns,
        on_nonfinite=on_nonfinite,
        resume=options["resume"],
        device=device,
    )


def _stack_reason(plan: _Plan) -> str | None:
    if plan.device.type != "cpu":
        # its fused rows and per-model sums are CPU code, and the stacked step has never run on a GPU
        return f"the stacked step runs on the CPU only, the models are on {plan.device.type}"
    reason = architecture_reason(plan.models)
    if reason is not None:
        return reason
    params = [[p for p in m.parameters() if p.requires_grad] for m in plan.models]
    return optimizer_reason(plan.optimizers, params)


def _detached(state: Any) -> Any:
    """A deep copy whose tensors own just their values (the live ones are views of stacked storage)."""
    copies = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            copies[id(value)] = value.detach().clone()
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(state)
    return copy.deepcopy(state, copies)


def _lr(optimizer: torch.optim.Optimizer) -> Any:
    lr = optimizer.param_groups[0].get("lr")
    return float(lr) if isinstance(lr, (int, float, torch.Tensor)) else lr


# -- the stacked path -------------------------------------------------------------------------------------


@dataclass
class _Segment:
    """A run of a window's steps within one epoch's schedule."""

    orders: list[torch.Tensor] | None
    schedule: list[tuple[torch.Tensor, torch.Tensor | None, int]]
    start: int
    count: int
    drawn_from: list[torch.Tensor] | None  # generator states before the window drew this epoch's order


class _Session:
    """What both ways of training K models share: which models still train."""

    K: int
    active: list[bool]

    def freeze(self, k: int) -> None:
        if not 0 <= k < self.K:
            raise IndexError(f"model index {k} out of range for {self.K} models")
        self.active[k] = False


class _Stacked(_Session):
    """K models trained as one: the epoch schedule, the stacked graphs and the fused update."""

    engine_name = "stacked-native"

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        K = plan.K
        self.K = K
        self.per_model = plan.order == "independent" or plan.subsets is not None
        self.sources = plan.subsets if plan.subsets is not None else None
        self.active = [True] * K
        self.updates = [0] * K
        self.step = plan.step_offset
        self.epochs_completed = 0
        self.position = 0
        self.schedule: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
        self.orders: list[torch.Tensor] | None = None
        self.shared_source = plan.generators[0] if plan.generators[0] is not None else torch.default_generator
        start = self.shared_source.get_state()
        self.copies = [torch.Generator().set_state(start) for _ in range(K)]
        if plan.resume is not None:
            self._restore_objects(plan.resume)
        self.stacked: StackedModels = stack(plan.models)
        params = [self.stacked.user_train[k] for k in range(K)]
        self.optimizer = StackedOptimizer(plan.optimizers, params, self.stacked.flat, self.stacked.offsets)
        self.optimizer.bind()
        self.train = TrainStep(self.stacked, plan.train_data, self.optimizer, len(plan.metrics))
        self.guard = plan.on_nonfinite != "continue"
        capture(
            plan.models,
            self.stacked,
            self.train,
            plan.loss_fn,
            self._example_indices(),
            last_label=plan.last_label,
            per_model_batch=self.per_model,
            guard=self.guard,
            metrics=list(plan.metrics.values()),
        )
        if plan.resume is not None:
            self._restore_position(plan.resume)
        self.step_runner = _C.ManyStep(
            sorted(self.stacked.graphs.items(), reverse=True),
            self.train.inputs,
            self.train.idx_slot,
            self.train.steps,
            self.guard,
            plan.on_nonfinite == "raise",
        )
        row_optimizer = self.optimizer.make_row_optimizer(self.train.last_grad)
        if row_optimizer is not None:
            self.step_runner.set_row_optimizer(row_optimizer)
        # the Loop's dataset is not read: the step graphs gather their own batches from the bound data
        dataset = _C.Dataset(list(plan.train_data), plan.batch_size, False, False, None, False)
        self.loop = _C.Loop(dataset, self.step_runner)
        self.released = False
        self.grad_copy: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
        self.grad_views = [
            [
                self.train.last_grad[k, a:b].view(p.shape)
                for p, (a, b) in zip(own, self.stacked.offsets, strict=True)
            ]
            for k, own in enumerate(self.stacked.user_train)
        ]

    # -- data order ------------------------------------------------------------------------------------
    def _sizes(self) -> list[int]:
        counts = [len(s) for s in self.sources] if self.sources is not None else [self.plan.n]
        sizes = set()
        for n in counts:
            bs = self.plan.batch_size
            sizes.add(min(bs, n))
            if n > bs and n % bs and not self.plan.drop_last:
                sizes.add(n % bs)
        return sorted(sizes, reverse=True)

    def _example_indices(self) -> list[torch.Tensor]:
        indices = []
        for size in self._sizes():
            if self.per_model:
                rows = [(s if s is not None else torch.arange(self.plan.n))[:size] for s in self._sources()]
                indices.append(torch.stack(rows).to(self.plan.device))
            else:
                indices.append(torch.arange(size, device=self.plan.device))
        return indices

    def _sources(self) -> list[torch.Tensor | None]:
        return list(self.sources) if self.sources is not None else [None] * self.K

    def _draw_orders(self) -> list[torch.Tensor]:
        plan = self.plan
        if not self.per_model:
            n = plan.n
            g = plan.generators[0]
            return [torch.randperm(n, generator=g) if plan.shuffle else torch.arange(n)]
        orders = []
        if plan.order == "shared":
            # each model draws from its own copy of the shared generator, as K fit() runs handed copies
            # would; the shared generator then moves on as model 0's copy did
            for k in range(self.K):
                n_k = len(self.sources[k])
                perm = torch.randperm(n_k, generator=self.copies[k]) if plan.shuffle else torch.arange(n_k)
                orders.append(self.sources[k][perm])
            if plan.shuffle:
                self.shared_source.set_state(self.copies[0].get_state())
            return orders
        for k in range(self.K):
            base = self.sources[k] if self.sources is not None else torch.arange(plan.n)
            n_k = len(base)
            perm = torch.randperm(n_k, generator=plan.generators[k]) if plan.shuffle else torch.arange(n_k)
            orders.append(base[perm])
        return orders

    def _build_schedule(
        self, orders: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """The epoch's steps: (indices ``[B]`` or ``[K, B]``, which models take it (None: all), size)."""
        bs, drop = self.plan.batch_size, self.plan.drop_last
        device = self.plan.device
        if not self.per_model:
            chunks = list(orders[0].split(bs))
            if drop and chunks and len(chunks[-1]) < bs and len(chunks) > 0 and orders[0].numel() >= bs:
                chunks.pop()
            return [(c.to(device), None, len(c)) for c in chunks]
        per_model = []
        for order in orders:
            chunks = list(order.split(bs))
            if drop and len(chunks) > 1 and len(chunks[-1]) < bs:
                chunks.pop()
            per_model.append(chunks)
        schedule = []
        for j in range(max(len(c) for c in per_model)):
            sizes = sorted({len(c[j]) for c in per_model if j < len(c)}, reverse=True)
            for size in sizes:
                taking = torch.tensor([j < len(c) and len(c[j]) == size for c in per_model])
                rows = [c[j] if bool(taking[k]) else per_model[0][0][:size] for k, c in enumerate(per_model)]
                rows = [r if len(r) == size else torch.zeros(size, dtype=torch.int64) for r in rows]
                schedule.append(
                    (torch.stack(rows).to(device), None if bool(taking.all()) else taking.to(device), size)
                )
        return schedule

    # -- control ---------------------------------------------------------------------------------------
    def events(self) -> Iterator[Event]:
        plan = self.plan
        while any(self.active):
            for m in plan.models:
                if not m.training:
                    m.train()
            started = time.perf_counter()
            totals = self._run_window()
            elapsed = time.perf_counter() - started
            self.step += 1
            event = self._event(totals, elapsed)
            yield event
            if totals["raise"] is not None:
                k, bad_step = totals["raise"]
                raise NonFiniteLossError(bad_step, self.updates[k])

    def _event(self, totals: dict[str, Any], elapsed: float) -> Event:
        plan = self.plan
        samples = totals["samples"]
        sums = totals["loss"].tolist()
        losses = [sums[k] / samples[k] if samples[k] else float("nan") for k in range(self.K)]
        event = Event(
            model=ModelList(plan.models, self),
            step=self.step,
            train_loss=losses,
            train_time_sec=elapsed,
            **plan.extra,
            epoch=self.epochs_completed,
            updates=list(self.updates),
            samples_per_sec=float(sum(samples)) / elapsed if elapsed > 0 else float("inf"),
            engine=self.engine_name,
            lr=[_lr(o) for o in plan.optimizers],
        )
        for i, key in enumerate(plan.metrics):
            values = totals["metrics"][i].tolist()
            event[key] = [values[k] / samples[k] if samples[k] else float("nan") for k in range(self.K)]
        event["active"] = list(self.active)
        if any(s is not None for s in totals["nonfinite"]):
            event["nonfinite_step"] = totals["nonfinite"]
        return event

    def _run_window(self) -> dict[str, Any]:
        plan, K = self.plan, self.K
        stacked, optimizer, train, step = self.stacked, self.optimizer, self.train, self.step_runner
        stacked.check_unchanged(plan.models)
        stacked.bind()
        optimizer.bind()
        optimizer.begin_window()
        train.select_updates()
        train.reset_sums()
        updates_before = list(self.updates)
        step.set_updates(
            train.update_all, train.all_inputs, train.update_rows, train.rows_inputs, *optimizer.fresh_rows()
        )
        nonfinite: list[int | None] = [None] * K
        raised = None
        left = plan.every
        steps, segments = self._plan_steps(left)
        entry = enter_window(self.loop, left if left is not None else len(steps))
        try:
            with _interrupt_at_step_boundary(self.loop):
                while True:
                    step.set_window([s[0] for s in steps], [s[1] for s in steps], self.active)
                    try:
                        self.loop.run(len(steps), False)
                    finally:
                        self._settle_window(segments, step.position)
                        self.active = list(step.active)
                        for k, bad in enumerate(step.nonfinite_steps):
                            if bad >= 0 and nonfinite[k] is None:
                                nonfinite[k] = updates_before[k] + bad
                    if step.raised_model >= 0:
                        k = step.raised_model
                        raised = (k, updates_before[k] + step.raised_step)
                        break
                    if left is None or not any(self.active):
                        break
                    left -= len(steps)
                    if left == 0:
                        break
                    steps, segments = self._plan_steps(left)
        finally:
            leave_window(entry)
            self._end_window(updates_before)
        return {
            "loss": train.loss_sum,
            "metrics": train.metric_sums,
            "samples": train.samples.tolist(),
            "nonfinite": nonfinite,
            "raise": raised,
        }

    def _plan_steps(self, limit: int | None) -> tuple[list[Any], list[_Segment]]:
        """The next run of the C++ loop: the rest of the epoch (``limit`` None), else up to ``limit`` steps,
        in runs of about ``_RUN_STEPS`` (Python plans the next run between them), drawing each epoch's
        order when the run reaches it; the segments settle the data position afterwards."""
        steps: list[Any] = []
        segments: list[_Segment] = []
        while limit is None or len(steps) < min(limit, _RUN_STEPS):
            drawn_from = None
            if self.position >= len(self.schedule):
                drawn_from = self._generator_states()
                self.orders = self._draw_orders()
                self.schedule = self._build_schedule(self.orders)
                self.position = 0
            start, left = self.position, len(self.schedule) - self.position
            count = left if limit is None else min(limit - len(steps), left)
            steps.extend(self.schedule[start : start + count])
            segments.append(_Segment(self.orders, self.schedule, start, count, drawn_from))
            self.position = start + count
            if limit is None:
                break
        return steps, segments

    def _settle_window(self, segments: list[_Segment], ran: int) -> None:
        """The data position after ``ran`` of the run's steps (all of them, or fewer after Ctrl-C or a
        raised non-finite loss): an epoch the run drew but never reached gives its draw back."""
        for i, segment in enumerate(segments):
            if ran == 0 and segment.drawn_from is not None:
                self._set_generator_states(segment.drawn_from)
                self.orders, self.schedule, self.position = None, [], 0
                return
            taken = min(ran, segment.count)
            ran -= taken
            self.orders, self.schedule = segment.orders, segment.schedule
            self.position = segment.start + taken
            if self.position >= len(self.schedule):
                self.epochs_completed += 1
                self.orders, self.schedule, self.position = None, [], 0
            if taken < segment.count:
                unreached = [s.drawn_from for s in segments[i + 1 :] if s.drawn_from is not None]
                if unreached:
                    self._set_generator_states(unreached[0])
                return

    def _generators(self) -> list[torch.Generator]:
        """The generators an epoch's draw moves (the per-model copies only for shared subsets)."""
        copies = self.copies if self.per_model and self.plan.order == "shared" else []
        unique: dict[int, torch.Generator] = {}
        for g in [*self.plan.generators, self.shared_source, *copies]:
            if g is not None:
                unique.setdefault(id(g), g)
        return list(unique.values())

    def _generator_states(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self._generators()]

    def _set_generator_states(self, states: list[torch.Tensor]) -> None:
        for g, state in zip(self._generators(), states, strict=True):
            g.set_state(state)

    def _end_window(self, updates_before: list[int]) -> None:
        self.updates = [u + n for u, n in zip(updates_before, self.train.steps.tolist(), strict=True)]
        self.optimizer.store([u > 0 for u in self.updates])
        # .grad as a plain loop leaves it: the last applied step's gradient, in the parameter's own tensor
        # (a view of the stacked gradient would trip torch's tensor teardown check)
        stepped = [k for k in range(self.K) if self.updates[k] != updates_before[k]]
        if not stepped:
            return
        cached = self.grad_copy
        if len(stepped) == self.K and cached is not None:
            params, destinations, sources = cached
            if all(map(operator.is_, [p.grad for p in params], destinations)):
                with torch.no_grad():
                    torch._foreach_copy_(destinations, sources)
                return
        params, destinations, sources = [], [], []
        for k in stepped:
            for p, view in zip(self.stacked.user_train[k], self.grad_views[k], strict=True):
                if p.grad is None or p.grad.shape != p.shape:
                    p.grad = torch.empty_like(p)
                params.append(p)
                destinations.append(p.grad)
                sources.append(view)
        with torch.no_grad():
            torch._foreach_copy_(destinations, sources)
        # the lists of a window where every model stepped serve the next such window while the .grad
        # tensors are still the ones they name
        self.grad_copy = (params, destinations, sources) if len(stepped) == self.K else None

    def release(self) -> None:
        """The user's tensors (parameters, buffers, optimizer state) stop being views of the
        stacked storage, so saving one model saves only its own values."""
        if self.released:
            return
        self.released = True
        self.loop = self.step_runner = None
        self.stacked.unbind()
        self.optimizer.unbind()

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "version": STATE_VERSION,
            "kind": "stacked",
            "models": [_detached(m.state_dict()) for m in plan.models],
            "optimizers": [_detached(o.state_dict()) for o in plan.optimizers],
            "step": self.step,
            "updates": list(self.updates),
            "active": list(self.active),
            "epochs_completed": self.epochs_completed,
            "position": self.position,
            "orders": [o.clone() for o in self.orders] if self.orders is not None else None,
            "generators": [g.get_state() if g is not None else None for g in plan.generators],
            "copies": [g.get_state() for g in self.copies],
            "rng": torch.get_rng_state(),
        }

    def _restore_objects(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "stacked" or len(state["models"]) != self.K:
            raise ValueError(f"resume state was not saved by a stacked fit_many run of {self.K} models")
        for m, s in zip(self.plan.models, state["models"], strict=True):
            m.load_state_dict(s)
        for o, s in zip(self.plan.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)

    def _restore_position(self, state: Mapping[str, Any]) -> None:
        for g, s in zip(self.plan.generators, state["generators"], strict=True):
            if g is not None and s is not None:
                g.set_state(s)
        for g, s in zip(self.copies, state["copies"], strict=True):
            g.set_state(s)
        torch.set_rng_state(state["rng"])
        self.step, self.updates = state["step"], list(state["updates"])
        self.active, self.epochs_completed = list(state["active"]), state["epochs_completed"]
        if state["orders"] is not None:
            self.orders = [o.clone() for o in state["orders"]]
            self.schedule = self._build_schedule(self.orders)
            self.position = state["position"]


# -- the sequential fallback (and K=1) ------------------------------------------------------------------


class _Sequential(_Session):
    """K ``fit`` runs in lock-step, one event of each merged into one event per window."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        K = plan.K
        self.K = K
        self.active = [True] * K
        self.streams: list[Any] = []
        self.last: list[Event | None] = [None] * K
        shared_state = None
        if plan.order == "shared":
            source = plan.generators[0] if plan.generators[0] is not None else torch.default_generator
            shared_state = source.get_state()
            self.source = source
        self.gens = []
        for k in range(K):
            if plan.order == "shared":
                g = torch.Generator().set_state(shared_state)
            else:
                g = plan.generators[k]
            self.gens.append(g)
            data = (
                plan.train_data
                if plan.subsets is None
                else [t[plan.subsets[k].to(t.device)] for t in plan.train_data]
            )
            self.streams.append(
                fit(
                    data,
                    plan.models[k],
                    plan.optimizers[k],
                    plan.loss_fn,
                    batch_size=plan.batch_size,
                    shuffle=plan.shuffle,
                    last_label=plan.last_label,
                    generator=g,
                    every=plan.every,
                    drop_last=plan.drop_last,
                    metrics=dict(plan.metrics) or None,
                    on_nonfinite={"freeze": "stop", "raise": "raise", "continue": "continue"}[
                        plan.on_nonfinite
                    ],
                    resume=plan.resume["runs"][k] if plan.resume is not None else None,
                )
            )
        self.step = plan.step_offset if plan.resume is None else plan.resume["step"]
        if plan.resume is not None:
            self.active = list(plan.resume["active"])

    def events(self) -> Iterator[Event]:
        plan = self.plan
        while any(self.active):
            started = time.perf_counter()
            nonfinite: list[int | None] = [None] * self.K
            fresh: list[Event | None] = [None] * self.K
            for k, stream in enumerate(self.streams):
                if not self.active[k]:
                    continue
                try:
                    fresh[k] = next(stream)
                except StopIteration:
                    self.active[k] = False
                    continue
                self.last[k] = fresh[k]
                if "nonfinite_step" in fresh[k]:
                    nonfinite[k] = fresh[k]["nonfinite_step"]
                    self.active[k] = False
            if plan.order == "shared" and plan.shuffle:
                self.source.set_state(self.gens[0].get_state())
            elapsed = time.perf_counter() - started
            self.step += 1
            engines = sorted({e["engine"] for e in fresh if e is not None})
            samples = sum(e["samples_per_sec"] * e["train_time_sec"] for e in fresh if e is not None)
            event = Event(
                model=ModelList(plan.models, self),
                step=self.step,
                train_loss=[e["train_loss"] if e is not None else float("nan") for e in fresh],
                train_time_sec=elapsed,
                **plan.extra,
                epoch=max((e["epoch"] for e in self.last if e is not None), default=0),
                updates=[e["updates"] if e is not None else 0 for e in self.last],
                samples_per_sec=samples / elapsed if elapsed > 0 else float("inf"),
                engine=("sequential " if self.K > 1 else "") + "/".join(engines),
                lr=[_lr(o) for o in plan.optimizers],
            )
            for key in plan.metrics:
                event[key] = [e[key] if e is not None else float("nan") for e in fresh]
            event["active"] = list(self.active)
            if any(s is not None for s in nonfinite):
                event["nonfinite_step"] = nonfinite
            yield event

    def release(self) -> None:
        for stream in self.streams:
            stream.close()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "sequential",
            "runs": [s.state_dict() for s in self.streams],
            "step": self.step,
            "active": list(self.active),
        }
