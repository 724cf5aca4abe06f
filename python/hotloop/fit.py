"""fit(): fitstream's epoch_stream with a native inner loop; validates lazily, yields an Event per window."""

from __future__ import annotations

import copy
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import distributed
from ._native import _C
from ._shared import enter_window, leave_window
from .clipping import nonfinite_norm_message
from .engines import choose_engine
from .events import Event
from .plan import STATE_VERSION, Plan, make_plan


class FitStream(Iterator[Event]):
    """The infinite event stream returned by :func:`fit`.

    Iterate it like a generator; ``close()`` stops training and frees the native state;
    ``state_dict()`` after an event captures what ``fit(..., resume=state)`` needs to continue the run
    exactly, in this process or another.
    """

    def __init__(self, start: Callable[[], Any]) -> None:  # a _Session, or fit_many's session
        # The session lives in a holder the generator shares, so the stream and its generator form no
        # reference cycle: dropping the last reference to the stream frees the native state at once.
        self._holder: list[Any] = []
        self._events = _generate(start, self._holder)

    def __iter__(self) -> FitStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Stop training and free the native loop, its dataset copy and buffers."""
        self._events.close()
        if self._holder:
            self._holder[0].release()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume after the last event: model, optimizer, data order, RNG, counters.

        Save it with ``torch.save``; pass it back as ``fit(..., resume=state)`` with the same data and
        options to get bit-identical events and weights to an uninterrupted run.
        """
        if not self._holder:
            raise RuntimeError("state_dict() needs at least one event: the stream has not started")
        return self._holder[0].state_dict()


def _generate(start: Callable[[], Any], holder: list[Any]) -> Iterator[Event]:
    holder.append(start())
    try:
        yield from holder[0].events()
    except GeneratorExit:
        holder[0].release()
        raise
    # An exception from training (Ctrl-C, a non-finite loss, the model) ends the stream but keeps the
    # session, so state_dict() can still checkpoint the run at the step boundary where it stopped;
    # close() or dropping the stream frees it.
    holder[0].release()


def fit(
    train_data: Sequence[torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int = 1,
    shuffle: bool = True,
    last_label: bool = True,
    generator: torch.Generator | None = None,
    extra: Mapping[str, Any] | None = None,
    step_offset: int = 0,
    every: int | None = None,
    drop_last: bool = False,
    engine: str = "auto",
    device: str | torch.device | None = None,
    metrics: Mapping[str, str | Callable[..., Any]] | None = None,
    scheduler: Any | None = None,
    scheduler_every: str = "step",
    on_nonfinite: str = "raise",
    amp: str | None = None,
    resume: Mapping[str, Any] | None = None,
    clip_grad_norm: float | tuple[Any, ...] | Mapping[str, Any] | None = None,
    clip_grad_value: float | None = None,
    accumulate: int = 1,
    seed: int = 0,
    sync_every: int | None = None,
    memory_format: str = "auto",
) -> FitStream:
    """Train ``model`` on in-memory tensors, yielding an :class:`Event` per epoch (or every ``every`` steps).

    A drop-in for ``fitstream.epoch_stream``: same arguments, same event keys (``model``, ``step``,
    ``train_loss``, ``train_time_sec`` and the keys of ``extra``), same batches, same results. The
    batches are gathered and the steps run in C++; Python runs once per event.

    Args:
        train_data: Tensors sharing their first (sample) dimension. With ``last_label=True`` the last
            one holds the labels and the others are the model's inputs.
        model: The module to train; it stays the truth (its parameters hold the trained values at
            every event).
        optimizer: A ``torch.optim.Optimizer`` over ``model``'s parameters.
        loss_fn: Called as ``loss_fn(pred, labels)``, or ``loss_fn(pred)`` when ``last_label=False``;
            must return the batch's mean loss.
        batch_size: Samples per optimizer step; the last batch of an epoch may be smaller.
        shuffle: Visit samples in ``torch.randperm(n, generator=generator)`` order each epoch.
        last_label: Whether the last tensor of ``train_data`` holds the labels.
        generator: ``torch.Generator`` for the shuffle (the default generator when ``None``).
        extra: Keys added to every event.
        step_offset: Added to the 1-based event index reported as ``step``.
        every: Yield every ``every`` optimizer steps (windows may cross epoch ends) instead of per epoch.
        drop_last: Skip the smaller last batch of each epoch.
        engine: ``"auto"`` (fastest that works), ``"graph"``, ``"aot"`` (the whole step compiled by
            AOTInductor, CPU), ``"native"`` or ``"python"``.
        device: Copy ``train_data`` to this device once before training (it must be the model's).
        metrics: Train metrics accumulated on the device during each window, as ``{event_key: metric}``;
            a metric is a built-in name (``"accuracy"``) or a function ``(pred, labels) -> batch mean``.
            Events report their sample-weighted mean over the window.
        scheduler: A ``torch.optim.lr_scheduler`` scheduler of ``optimizer``, stepped after every
            optimizer step (``scheduler_every="step"``) or once per event (``"event"``, before the event is
            yielded). Events report ``lr``: the first param group's learning rate when the event is
            yielded, i.e. the one the next step will use.
        on_nonfinite: What a non-finite loss does: ``"raise"`` (default) raises
            :class:`NonFiniteLossError` naming the step, ``"stop"`` yields a last event (with
            ``nonfinite_step``) and ends the stream, ``"continue"`` trains on as a plain loop would.
            With ``"raise"`` and ``"stop"`` the offending update is not applied.
        amp: Mixed precision: ``None`` (default), ``"bf16"`` or ``"fp16"``. Forward and loss run under
            ``torch.autocast`` with that dtype; fp16 adds ``torch.amp.GradScaler``'s loss scaling (inside
            the CUDA graphs in the graph engine; the scale lives as long as the stream and is not part of
            :meth:`FitStream.state_dict`). The graph and python engines run it, the native one does not
            (``"auto"`` falls back to python on CPU).
        resume: A :meth:`FitStream.state_dict` to continue from: loads the model and optimizer state,
            the data order, the random generators and the counters.
        clip_grad_norm: Clip the gradients of the optimizer's parameters between ``backward()`` and
            ``step()`` as ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type,
            error_if_nonfinite)`` does: a max norm, ``(max_norm[, norm_type[, error_if_nonfinite]])`` or a
            dict with those keys. With ``error_if_nonfinite=True`` a step whose total norm is NaN or
            infinite (or whose loss is) is not applied and the stream raises :class:`NonFiniteGradNormError`
            (a ``RuntimeError`` with torch's message) at the end of its window, whatever ``on_nonfinite``.
        clip_grad_value: Then clamp those gradients to ``[-clip_grad_value, clip_grad_value]``, as
            ``torch.nn.utils.clip_grad_value_`` does.
        accumulate: Micro-batches of ``batch_size`` per optimizer step (gradient accumulation). Each
            optimizer step takes the next ``accumulate * batch_size`` samples of the epoch's order, split
            into micro-batches of ``batch_size``, each backpropagating ``loss / accumulate``; the last
            step of an epoch takes what is left (fewer micro-batches, still divided by ``accumulate``), or
            is skipped with ``drop_last=True``. That is this plain loop::

                for epoch in range(epochs):
                    order = torch.randperm(n, generator=generator)
                    groups = order.split(batch_size * accumulate)
                    if drop_last and len(groups[-1]) < batch_size * accumulate:
                        groups = groups[:-1]
                    for group in groups:
                        optimizer.zero_grad()
                        for index in group.split(batch_size):
                            (loss_fn(model(x[index]), y[index]) / accumulate).backward()
                        optimizer.step()  # then clipping before it, the scheduler after it

            ``every``, ``updates``, per-step schedulers and the resume state count optimizer steps;
            ``train_loss`` and metrics are sample-weighted means over the micro-batches. A step in which
            any micro-batch's loss is not finite is not applied (as a whole).
        seed: Only for a ``DistributedDataParallel`` model under ``torchrun``: each rank trains on the
            batches ``DistributedSampler(shuffle=shuffle, seed=seed, drop_last=drop_last)`` gives it (epoch
            e shuffled by a generator seeded ``seed + e``, not ``generator``), batched with ``drop_last``.
        memory_format: The layout the native engine runs 4-D tensors (convolutions) in: ``"auto"``
            (default) runs models with ``nn.Conv2d`` on the CPU in ``torch.channels_last``, which measured
            faster there; ``"preserve"`` keeps the user's layouts, so the step rounds exactly as the plain
            loop does; ``"channels_last"`` asks for channels_last wherever the native engine runs. The
            user's tensors (parameters, ``.grad``, optimizer state, events) keep their own layout
            either way: the step reads channels_last copies. channels_last kernels round differently
            from contiguous ones, so a run then matches the plain loop to float32 rounding, not bitwise
            (tested to 1e-5 of each tensor's largest value; 2e-6 measured after 210 Adam steps). The graph and
            python engines run the user's layouts.

    Events also carry ``epoch`` (epochs completed), ``updates`` (optimizer steps so far),
    ``samples_per_sec`` and ``engine``. Nothing runs, and bad arguments are not reported, until the
    first ``next()``.

    Example:
        >>> x = torch.tensor([[1.0], [2.0]])
        >>> y = torch.tensor([[1.0], [2.0]])
        >>> model = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        >>> stream = fit((x, y), model, optimizer, nn.MSELoss(), batch_size=2, shuffle=False, engine="python")
        >>> event = next(stream)
        >>> event["step"], event["train_loss"], event["updates"]
        (1, 2.5, 1)
    """
    options = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        last_label=last_label,
        generator=generator,
        extra=extra,
        step_offset=step_offset,
        every=every,
        drop_last=drop_last,
        engine=engine,
        device=device,
        metrics=metrics,
        scheduler=scheduler,
        scheduler_every=scheduler_every,
        on_nonfinite=on_nonfinite,
        amp=amp,
        resume=resume,
        clip_grad_norm=clip_grad_norm,
        clip_grad_value=clip_grad_value,
        accumulate=accumulate,
        seed=seed,
        sync_every=sync_every,
        memory_format=memory_format,
    )
    return FitStream(lambda: _Session(make_plan(train_data, model, optimizer, loss_fn, **options)))


epoch_stream = fit


class NonFiniteLossError(FloatingPointError):
    """The loss of a training step was NaN or infinite; the model holds the weights of the step before."""

    def __init__(self, step: int, updates: int) -> None:
        super().__init__(
            f"non-finite loss at optimizer step {step}; its update was not applied, so the model holds the "
            f"weights after step {updates} (pass on_nonfinite='stop' or 'continue' to change this)"
        )
        self.step = step


class NonFiniteGradNormError(RuntimeError):
    """``clip_grad_norm`` with ``error_if_nonfinite=True`` met a non-finite total gradient norm (or loss), as
    ``torch.nn.utils.clip_grad_norm_`` raises there; the model holds the weights of the step before."""

    def __init__(self, norm_type: float, step: int, updates: int) -> None:
        super().__init__(
            f"{nonfinite_norm_message(norm_type)} (optimizer step {step}; its update was not applied, so the "
            f"model holds the weights after step {updates})"
        )
        self.step = step


class _Session:
    """One planned training run: the native loop, its dataset and the counters reported in events."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.model, self.optimizer, self.generator = plan.model, plan.optimizer, plan.generator
        self.batching = {
            "batch_size": plan.batch_size,
            "shuffle": plan.shuffle,
            "drop_last": plan.drop_last,
            "accumulate": plan.accumulate,
        }
        self.step = plan.step_offset
        self.updates_before = 0
        with distributed.rank_zero_warns(plan.data_parallel):
            self.choice = choose_engine(plan)
        self.dataset = _C.Dataset(
            list(plan.train_data),
            plan.step_samples,
            plan.shuffle,
            plan.drop_last,
            plan.generator,
            self.choice.reuse_buffers,
        )
        data_parallel = plan.data_parallel
        local_sgd = data_parallel is not None and data_parallel.sync_every is not None
        if local_sgd and self.choice.name != "native":
            raise ValueError(f"sync_every needs the native engine, and fit() chose {self.choice.name}")
        if data_parallel is not None:
            # the shard's order follows from seed, epoch and rank: a saved state resumes on any rank of a
            # world of the same size
            self.batching["world"] = data_parallel.world
            self.dataset.set_shard(
                data_parallel.world, data_parallel.rank, data_parallel.seed, plan.drop_last
            )
        self.loop = _C.Loop(self.dataset, self.choice.step)
        self.loop.set_guard_nonfinite(plan.guard_nonfinite)
        if plan.resume is not None:
            self._restore(plan.resume)

    def events(self) -> Iterator[Event]:
        plan = self.plan
        while True:
            self.model.train()
            started = time.perf_counter()
            stats = self._run_window()
            elapsed = time.perf_counter() - started
            self.step += 1
            if plan.scheduler is not None and plan.scheduler_every == "event":
                plan.scheduler.step()
            lr = self.optimizer.param_groups[0].get("lr")
            event = Event(
                model=self.model,
                step=self.step,
                train_loss=stats.loss_sum / stats.samples if stats.samples else float("nan"),
                train_time_sec=elapsed,
                **plan.extra,
                epoch=self.dataset.epochs_completed,
                updates=self.updates_before + self.loop.total_steps,
                samples_per_sec=stats.samples / elapsed if elapsed > 0 else float("inf"),
                engine=self.choice.name,
                lr=float(lr) if isinstance(lr, (int, float)) else lr,
            )
            for key, total in zip(plan.metrics, stats.metric_sums, strict=True):
                event[key] = total / stats.samples if stats.samples else float("nan")
            if stats.nonfinite_step >= 0:
                bad_step = self.updates_before + stats.nonfinite_step
                applied = self.updates_before + self.loop.total_steps
                if plan.error_if_nonfinite_norm:
                    norm_type = plan.grad_clip.norm.norm_type  # type: ignore[union-attr]
                    raise NonFiniteGradNormError(norm_type, bad_step, applied)
                if plan.on_nonfinite == "raise":
                    raise NonFiniteLossError(bad_step, applied)
                event["nonfinite_step"] = bad_step
                yield event
                return
            yield event

    def _run_window(self) -> Any:
        every = self.plan.every
        planned = every or self.dataset.batches_per_epoch - self.dataset.batch_index
        if self.choice.begin_window is not None:
            self.choice.begin_window(planned)
        entry = enter_window(self.loop, planned)
        data_parallel = self.plan.data_parallel
        # Under a process group a Ctrl-C is agreed on at the window's end, so every rank stops at the same
        # step and none waits in a collective for a rank that left.
        deferred: list[bool] | None = None if data_parallel is None else []
        try:
            with _interrupt_at_step_boundary(self.loop, deferred):
                if data_parallel is None:
                    stats = self._run_steps(every)
                else:
                    stats = self._run_steps_data_parallel(data_parallel, every)
            if data_parallel is not None and distributed.any_rank(data_parallel, bool(deferred)):
                raise KeyboardInterrupt("interrupted on some rank; every rank stops after this window")
            return stats
        finally:
            leave_window(entry)
            if self.choice.end_window is not None:
                self.choice.end_window()

    def _run_steps(self, every: int | None) -> Any:
        if every is None:
            return self.loop.run(self.dataset.batches_per_epoch, True)
        return self.loop.run(every, False)

    def _run_steps_data_parallel(self, data_parallel: Any, every: int | None) -> Any:
        try:
            if data_parallel.sync_every is not None:
                return distributed.local_sgd_window(
                    data_parallel, self.loop, self.dataset, every, self.updates_before
                )
            stats = self._run_steps(every)
        except RuntimeError as exc:
            raise distributed.collective_failure(data_parallel, exc) from exc
        if self.choice.name != "native":
            stats = distributed.reduce_window(data_parallel, stats)  # the native step reduces its own
        return stats

    def release(self) -> None:
        self.loop = self.dataset = self.choice = None  # type: ignore[assignment]

    def state_dict(self) -> dict[str, Any]:
        if self.loop is None:
            raise RuntimeError("state_dict() is not available after the stream was closed")
        order = self.dataset.epoch_order
        return {
            "version": STATE_VERSION,
            # Copies, not the live tensors: the snapshot must not move on when training continues.
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self.step,
            "updates": self.updates_before + self.loop.total_steps,
            "epochs_completed": self.dataset.epochs_completed,
            "batch_index": self.dataset.batch_index,
            "epoch_order": order.cpu()
            if order is not None and self.dataset.batch_index > 0 and self.plan.data_parallel is None
            else None,
            "batching": dict(self.batching),
            "num_samples": self.dataset.num_samples,
            "generator": self.generator.get_state() if self.generator is not None else None,
            "scheduler": self.plan.scheduler.state_dict() if self.plan.scheduler is not None else None,
            "rng": _rng_states(),
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        # Every check comes before the first load: a mismatched state leaves the user's objects as they were.
        if state["num_samples"] != self.dataset.num_samples:
            raise ValueError(
                f"resume state was saved for {state['num_samples']} samples, but train_data has "
                f"{self.dataset.num_samples}"
            )
        for key, value in self.batching.items():
            saved = state["batching"].get(key, 1 if key == "accumulate" else None)  # states before accumulate
            if saved != value:
                raise ValueError(
                    f"resume state was saved with {key}={saved!r}, this fit() call has "
                    f"{key}={value!r}: the data position would not match"
                )
        if (state["generator"] is None) != (self.generator is None):
            raise ValueError("resume state and this fit() call disagree on whether a generator is given")
        scheduler = self.plan.scheduler
        if (state["scheduler"] is None) != (scheduler is None):
            raise ValueError("resume state and this fit() call disagree on whether a scheduler is given")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_states(state["rng"])
        order = state["epoch_order"]
        self.dataset.restore(
            order if order is not None else torch.empty(0, dtype=torch.long),
            state["batch_index"],
            state["epochs_completed"],
        )
        self.step = state["step"]
        self.updates_before = state["updates"]


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def _interrupt_at_step_boundary(loop: Any, deferred: list[bool] | None = None) -> Iterator[None]:
    """Turn Ctrl-C during a window into a KeyboardInterrupt raised between two steps, never inside one.

    Only Python's default SIGINT handler is replaced, and only from the main thread; a handler the user
    installed runs as usual. A Ctrl-C the loop did not see (it came after the window's last check) is
    raised when the window returns. With ``deferred`` (a list) a Ctrl-C lets the window finish and is
    only recorded there, for the caller to act on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    interrupted = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if deferred is not None:
            deferred.append(True)
            return
        interrupted = True
        loop.request_interrupt()

    loop.clear_interrupt()
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        loop.clear_interrupt()
        raise KeyboardInterrupt
