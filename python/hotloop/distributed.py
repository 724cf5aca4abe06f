"""Data-parallel training under ``torchrun``: what a ``DistributedDataParallel`` model asks of ``fit()``.

A DDP model is trained natively by unwrapping ``.module`` and putting DDP's collectives into the captured
step itself, as ordinary dispatcher ops (``_c10d_functional.broadcast_`` of the buffers before forward,
``_c10d_functional.all_reduce_`` of one flat buffer holding the gradients divided by the world size, the
loss and the train metrics after backward), so the C++ loop runs them with the GIL released and every rank
sees the same loss: the non-finite guard, the events and whatever a stage decides on them agree on all
ranks. The data is sharded as ``DistributedSampler`` shards it (``_C.Dataset.set_shard``). DDP options whose
effect the captured step cannot reproduce are refused with their name, and the python engine then runs the
DDP wrapper itself (eager DDP on the same shards).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._shared import SlowPathWarning

_c10d = torch.ops._c10d_functional
# The last tensors given to eager collectives. Gloo's worker thread drops its reference after the caller
# has woken up; were that the last one, freeing the tensor's Python object would need the GIL in that
# thread, and a destroy_process_group() right after (holding the GIL, joining the thread) would deadlock.
_recent: collections.deque[torch.Tensor] = collections.deque(maxlen=8)


def _all_reduce(tensor: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    _recent.append(tensor)
    if op is None:
        dist.all_reduce(tensor, group=group)
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def is_ddp(model: Any) -> bool:
    return any(
        c.__name__ == "DistributedDataParallel" and c.__module__.startswith("torch.nn.parallel")
        for c in type(model).__mro__
    )


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Distributed:
    """One rank's view of a data-parallel ``fit()``: the user's DDP wrapper, its process group, the shard."""

    wrapper: nn.Module  # the user's DistributedDataParallel
    group: Any  # its torch.distributed ProcessGroup
    rank: int
    world: int
    seed: int  # DistributedSampler's seed: epoch e is shuffled by a generator seeded seed + e
    sync_every: int | None = None  # local SGD: parameters averaged every sync_every steps, no gradient sync

    @property
    def module(self) -> nn.Module:
        return self.wrapper.module

    @property
    def group_name(self) -> str:
        return self.group.group_name

    @property
    def broadcast_buffers(self) -> bool:
        return bool(getattr(self.wrapper, "broadcast_buffers", False)) and self.world > 1

    def shard_samples(self, num_samples: int, drop_last: bool) -> int:
        """Samples per rank and epoch: DistributedSampler's ``num_samples``."""
        if drop_last:
            return num_samples // self.world
        return -(-num_samples // self.world)


_told_alone = False


def setup(model: nn.Module, *, seed: int, sync_every: int | None = None) -> Distributed | None:
    """The data-parallel setup of a ``fit()`` call on ``model``, or None when it trains alone.

    A plain model inside an initialised process group trains alone on each rank, as before; that is said
    once (a ``UserWarning`` on rank 0)."""
    global _told_alone
    if not is_ddp(model):
        if initialized() and not _told_alone:
            _told_alone = True
            if dist.get_rank() == 0:
                warnings.warn(
                    "a process group is initialised but the model is not wrapped in DistributedDataParallel: "
                    "every rank trains its own model on all the data (wrap it in DDP to train data-parallel)",
                    UserWarning,
                    stacklevel=4,
                )
        if sync_every is not None:
            raise ValueError("sync_every needs a DistributedDataParallel model (its process group is used)")
        return None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    group = model.process_group
    return Distributed(
        wrapper=model, group=group, rank=group.rank(), world=group.size(), seed=seed, sync_every=sync_every
    )


def native_refusal(setup: Distributed) -> str | None:
    """Why the native engine cannot reproduce this DDP wrapper's step exactly, naming the option, or None."""
    ddp = setup.wrapper
    checks = (
        (getattr(ddp, "find_unused_parameters", False), "find_unused_parameters=True"),
        (getattr(ddp, "static_graph", False), "static_graph=True"),
        (getattr(ddp, "_comm_hooks", None), "a registered comm hook (register_comm_hook)"),
        (not getattr(ddp, "require_backward_grad_sync", True), "no_sync() (gradient sync is switched off)"),
        (getattr(ddp, "mixed_precision", None) is not None, "DDP mixed_precision"),
        (getattr(ddp, "parameters_to_ignore", None), "parameters ignored by DDP"),
        (getattr(ddp, "_delay_all_reduce_all_params", False), "delay_all_reduce_named_params"),
        (getattr(ddp, "_delay_all_reduce_params", None), "delay_all_reduce_named_params"),
        (getattr(ddp, "_use_python_reducer", False), "the python reducer (compiled DDP)"),
        (getattr(ddp, "device_mesh", None) is not None, "a device_mesh"),
        (getattr(ddp, "_join_config", None) is not None and ddp._join_config.enable, "the Join context"),
    )
    for unsupported, what in checks:
        if unsupported:
            return (
                f"the DistributedDataParallel model uses {what}, which the native engine's in-graph "
                "all-reduce does not reproduce"
            )
    for attribute in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
        if getattr(ddp, attribute, None):
            return (
                f"the DistributedDataParallel wrapper itself has module hooks ({attribute}), which the "
                "native engine (it captures the wrapped module) would not run"
            )
    if getattr(ddp, "buffer_hook", None) is not None:
        return (
            "the DistributedDataParallel model has a buffer comm hook, which the native engine does not run"
        )
    return None


@contextmanager
def rank_zero_warns(setup: Distributed | None) -> Iterator[None]:
    """Inside the block, hotloop's fallback warnings are shown on rank 0 only (every rank takes the same
    decision; one copy of the reason is enough)."""
    if setup is None or setup.rank == 0:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        yield


def check_agreement(setup: Distributed, **values: Any) -> None:
    """Every rank must train with the same number of samples and options, or the ranks would not take the
    same number of steps and one would wait for the others forever: one collective at the start."""
    if setup.world == 1:
        return
    gathered: list[Any] = [None] * setup.world
    dist.all_gather_object(gathered, values, group=setup.group)
    for rank, theirs in enumerate(gathered):
        for key, value in values.items():
            if theirs[key] != value:
                raise ValueError(
                    f"the ranks disagree on {key}: rank {setup.rank} has {value!r}, rank {rank} has "
                    f"{theirs[key]!r}; every rank must call fit() with the same data size and options"
                )


def example_batches(
    setup: Distributed, data: Sequence[torch.Tensor], batch_size: int, drop_last: bool
) -> list[list[torch.Tensor]]:
    """One batch of each size this rank will train on, of samples specific to this rank (its first
    shard): with the same batch on every rank a missing all-reduce would pass the capture check."""
    n = data[0].shape[0]
    per_rank = setup.shard_samples(n, drop_last)
    index = torch.arange(setup.rank, per_rank * setup.world, setup.world) % n
    sizes = [min(batch_size, per_rank)]
    if not drop_last and per_rank % batch_size and per_rank > batch_size:
        sizes.append(per_rank % batch_size)
    index = index.to(data[0].device)
    return [[t.index_select(0, index[:size]) for t in data] for size in sizes]


def synced(
    setup: Distributed,
    joint: Callable[..., tuple[torch.Tensor, ...]],
    buffer_positions: Sequence[int],
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``joint`` (``(params, state, *batch) -> (*grads, loss, *metrics)``) with DDP's collectives traced in:
    the buffers (``state[i]`` for i in ``buffer_positions``) broadcast from rank 0 before forward, as
    ``broadcast_buffers=True`` does; then one all-reduce of the gradients divided by the world size (DDP
    divides before summing) together with loss and metrics (their mean over the ranks)."""
    world, name = setup.world, setup.group_name
    broadcast = setup.broadcast_buffers
    if world == 1:
        return joint  # a group of one: DDP's division by 1 and its collectives change nothing

    def step(params: list[torch.Tensor], state: list[torch.Tensor], *batch: torch.Tensor):
        if broadcast and buffer_positions:
            for group in _by_dtype([state[i] for i in buffer_positions]):
                flat = torch.cat([t.reshape(-1) for t in group])
                flat = _c10d.wait_tensor(_c10d.broadcast_(flat, 0, name))
                for tensor, value in zip(group, _split(flat, group), strict=True):
                    tensor.copy_(value)
        outputs = joint(params, state, *batch)
        reduced = [t / world for t in outputs]
        result: dict[int, torch.Tensor] = {}
        for group in _by_dtype(list(range(len(reduced))), key=lambda i: reduced[i].dtype):
            tensors = [reduced[i] for i in group]
            flat = torch.cat([t.reshape(-1) for t in tensors])
            flat = _c10d.wait_tensor(_c10d.all_reduce_(flat, "sum", name))
            result.update(zip(group, _split(flat, tensors), strict=True))
        return tuple(result[i] for i in range(len(reduced)))

    return step


def _by_dtype(items: list[Any], key: Callable[[Any], Any] = lambda t: t.dtype) -> list[list[Any]]:
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    pieces = torch.split(flat, [t.numel() for t in like])
    return [p.view(t.shape) for p, t in zip(pieces, like, strict=True)]


def mean_over_ranks(setup: Distributed, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The ranks' mean of each value (eagerly, for the capture check's reference)."""
    out = []
    for value in values:
        out.append(_all_reduce(value.detach() / setup.world, setup.group))
    return out


def collective_failure(setup: Distributed, exc: BaseException) -> RuntimeError:
    """The error a rank raises when a collective of its step failed: another rank stopped or failed."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return RuntimeError(
        f"rank {setup.rank}: the data-parallel step failed ({type(exc).__name__}: {first_line}); when a "
        "collective fails, another rank stopped, failed or left (its own error says why), and every rank "
        "stops"
    )


def reduce_window(setup: Distributed, stats: Any) -> Any:
    """A window's sums over all ranks (engines whose step does not reduce its loss), so every rank reports
    the same event; the first non-finite step of any rank."""
    if setup.world == 1:
        return stats
    values = torch.tensor([stats.loss_sum, float(stats.samples), *stats.metric_sums], dtype=torch.float64)
    _all_reduce(values, setup.group)
    bad = torch.tensor([stats.nonfinite_step if stats.nonfinite_step >= 0 else 2**62], dtype=torch.int64)
    _all_reduce(bad, setup.group, dist.ReduceOp.MIN)
    return SimpleNamespace(
        loss_sum=values[0].item(),
        samples=int(values[1].item()),
        steps=stats.steps,
        metric_sums=values[2:].tolist(),
        nonfinite_step=int(bad.item()) if bad.item() < 2**62 else -1,
    )


def local_sgd_window(
    setup: Distributed, loop: Any, dataset: Any, every: int | None, updates_before: int
) -> Any:
    """One window of local SGD (``sync_every``): each rank steps alone; after every ``sync_every``-th step
    of the run, and at the window's end, one all-reduce carries the parameters and a stop flag (a rank's
    non-finite loss), so the ranks always make the same collective calls; the parameters are replaced by
    their mean over the ranks only at a multiple of ``sync_every``. Returns the window's stats summed over
    the ranks."""
    period = setup.sync_every
    assert period is not None
    params = [p for p in setup.module.parameters() if p.requires_grad]
    loss_sum, samples, steps, metric_sums, bad = 0.0, 0, 0, None, -1
    while True:
        done = updates_before + loop.total_steps
        chunk = period - done % period
        if every is not None:
            chunk = min(chunk, every - steps)
        stats = loop.run(chunk, every is None)
        loss_sum += stats.loss_sum
        samples += stats.samples
        steps += stats.steps
        sums = list(stats.metric_sums)
        metric_sums = sums if metric_sums is None else [a + b for a, b in zip(metric_sums, sums, strict=True)]
        if stats.nonfinite_step >= 0 and bad < 0:
            bad = stats.nonfinite_step
        with torch.no_grad():
            flat = torch.cat(
                [p.detach().reshape(-1) / setup.world for p in params]
                + [torch.tensor([1.0 if bad >= 0 else 0.0], dtype=params[0].dtype, device=params[0].device)]
            )
            _all_reduce(flat, setup.group)
            stop = bool(flat[-1].item() > 0)
            if not stop and (updates_before + loop.total_steps) % period == 0:
                for p, value in zip(params, _split(flat[:-1], params), strict=True):
                    p.copy_(value)
        window_done = steps >= every if every is not None else dataset.batch_index == 0
        if stop or window_done:
            break
    total = SimpleNamespace(
        loss_sum=loss_sum, samples=samples, steps=steps, metric_sums=metric_sums or [], nonfinite_step=bad
    )
    return reduce_window(setup, total)


def any_rank(setup: Distributed, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (one collective)."""
    if setup.world == 1:
        return flag
    value = _all_reduce(torch.tensor([1.0 if flag else 0.0]), setup.group)
    return bool(value.item() > 0)
