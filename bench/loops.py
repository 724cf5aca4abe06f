"""The plain training loops under test, and what every contender's setup returns: a Runner.

Each setup returns a Runner whose ``run()`` trains one window.

A window is ``workload.steps`` optimizer steps on shuffled full batches; ``run()`` returns the window's
mean training loss as a float (which synchronises the device). A setup raises :class:`Skip` when the
contender does not apply; any other exception is reported by the harness as the reason it was skipped.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .workloads import Workload

Data = tuple[torch.Tensor, ...]


class Skip(Exception):
    """The contender does not apply here; the message says why."""


@dataclass
class Runner:
    run: Callable[[], float]
    close: Callable[[], None] = lambda: None


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def generator(device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def epochs(data: Data, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """fitstream's iter_batches, epoch after epoch: randperm split by batch_size, gathered by indexing."""
    while True:
        order = torch.randperm(data[0].shape[0], device=data[0].device, generator=generator)
        for index in order.split(batch_size):
            yield tuple(t[index] for t in data)


def window(
    batches: Iterator[tuple[torch.Tensor, ...]], steps: int, step: Callable[..., torch.Tensor], device
) -> float:
    """Run ``steps`` steps, accumulating the sample-weighted loss on the device like fitstream does."""
    total = torch.zeros((), device=device)
    samples = 0
    for _ in range(steps):
        batch = next(batches)
        total += step(*batch) * batch[0].shape[0]
        samples += batch[0].shape[0]
    return (total / samples).item()


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module):
    def step(*batch: torch.Tensor) -> torch.Tensor:
        *inputs, labels = batch
        loss = loss_fn(model(*inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def eager(w: Workload, data: Data, device: torch.device) -> Runner:
    model, optimizer, loss_fn = w.build(device)
    batches = epochs(data, w.batch_size, generator(device))
    step = _plain_step(model, optimizer, loss_fn)
    return Runner(lambda: window(batches, w.steps, step, device))


def fused_form(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer built ``fused=True`` (one kernel per step for all parameters), or Skip."""
    try:
        return type(optimizer)(model.parameters(), **{**optimizer.defaults, "fused": True, "foreach": None})
    except (TypeError, RuntimeError, ValueError) as exc:
        raise Skip(f"{type(optimizer).__name__} has no fused form here: {exc}") from None


def eager_fused(w: Workload, data: Data, device: torch.device) -> Runner:
    """The eager loop with the optimizer built ``fused=True`` (one kernel per step for all parameters)."""
    model, optimizer, loss_fn = w.build(device)
    optimizer = fused_form(model, optimizer)
    batches = epochs(data, w.batch_size, generator(device))
    step = _plain_step(model, optimizer, loss_fn)
    return Runner(lambda: window(batches, w.steps, step, device))


def tensor_loader(data: Data, batch_size: int) -> torch.utils.data.DataLoader:
    dataset = torch.utils.data.TensorDataset(*data)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator("cpu")
    )


def _dataloader_batches(data: Data, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    loader = tensor_loader(data, batch_size)
    while True:
        yield from loader


def dataloader(w: Workload, data: Data, device: torch.device) -> Runner:
    model, optimizer, loss_fn = w.build(device)
    batches = _dataloader_batches(data, w.batch_size)
    step = _plain_step(model, optimizer, loss_fn)
    return Runner(lambda: window(batches, w.steps, step, device))


def compiled(w: Workload, data: Data, device: torch.device) -> Runner:
    """torch.compile of the eager step function as written: model, loss, zero_grad, backward, step.

    Dynamo breaks the graph around ``backward`` (compiled autograd is off), so the forward, the backward and
    the optimizer step run as separate compiled pieces; ``mode="reduce-overhead"`` (CUDA graphs) on CUDA.
    """
    model, optimizer, loss_fn = w.build(device)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    torch._dynamo.reset()  # one code object serves every workload: start from a clean recompile budget
    step = torch.compile(_plain_step(model, optimizer, loss_fn), mode=mode)
    if device.type == "cuda":
        inner = step

        def step(*batch: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return inner(*batch)

    batches = epochs(data, w.batch_size, generator(device))
    return Runner(lambda: window(batches, w.steps, step, device))


def fitstream_loop(w: Workload, data: Data, device: torch.device) -> Runner:
    if not installed("fitstream"):
        raise Skip("fitstream is not installed")
    import fitstream

    if w.n_samples != w.steps * w.batch_size:
        raise Skip("fitstream yields once per epoch and this window is not an epoch")
    model, optimizer, loss_fn = w.build(device)
    stream = fitstream.epoch_stream(
        data, model, optimizer, loss_fn, batch_size=w.batch_size, generator=generator(device)
    )
    return Runner(lambda: next(stream)["train_loss"], stream.close)


def hotloop_engine(
    engine: str, fused: bool = False, **options: object
) -> Callable[[Workload, Data, torch.device], Runner]:
    """``fit(engine=engine, **options)``; with ``fused`` the optimizer is built ``fused=True``, as in the
    fused eager loop (the native engine then steps with torch's fused kernels; otherwise it replays the
    default step)."""

    def setup(w: Workload, data: Data, device: torch.device) -> Runner:
        import hotloop

        model, optimizer, loss_fn = w.build(device)
        if fused:
            optimizer = fused_form(model, optimizer)
        stream = hotloop.fit(
            data, model, optimizer, loss_fn, batch_size=w.batch_size, generator=generator(device),
            every=w.steps, engine=engine, **options,
        )  # fmt: skip

        def run() -> float:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                event = next(stream)
            if event["engine"] != engine:
                said = "; ".join(str(c.message) for c in caught) or "no warning"
                raise RuntimeError(f"engine={engine!r} ran as {event['engine']!r} ({said})")
            return event["train_loss"]

        return Runner(run, stream.close)

    return setup


def cold_compile(setup: Callable[[Workload, Data, torch.device], Runner]):
    """``setup`` whose first window (where fit() compiles) sees an empty aot package cache and an empty
    Inductor cache, so the setup time the harness reports holds a cold compile (never timed)."""

    def cold(w: Workload, data: Data, device: torch.device) -> Runner:
        runner = setup(w, data, device)
        first = [True]

        def run() -> float:
            if not first[0]:
                return runner.run()
            first[0] = False
            keys = ("HOTLOOP_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
            saved = {key: os.environ.get(key) for key in keys}
            with tempfile.TemporaryDirectory(prefix="hotloop-bench-") as cache:
                for key in keys:
                    os.environ[key] = os.path.join(cache, key.lower())
                try:
                    return runner.run()  # the package stays loaded after its file is gone
                finally:
                    for key, value in saved.items():
                        if value is None:
                            del os.environ[key]
                        else:
                            os.environ[key] = value

        return Runner(run, runner.close)

    return cold


def graph_floor(w: Workload, data: Data, device: torch.device) -> Runner:
    """CUDA only: the eager step's kernels for a whole window captured as one CUDA graph, replayed once.

    The launch floor under the graph engine: per step the same work (index_select gather, forward, loss,
    backward, the fused capturable optimizer step, loss accumulation) with no launch, no Python and no
    synchronisation between steps; the epoch order is drawn into a static buffer before each replay.
    """
    if device.type != "cuda":
        raise Skip("CUDA only: a CUDA graph of the whole window")
    if w.n_samples != w.steps * w.batch_size:
        raise Skip("the window must be exactly one epoch of full batches")
    model, optimizer, loss_fn = w.build(device)
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=False)  # as the graph engine captures it
        if "capturable" in group:
            group["capturable"] = True
    n = data[0].shape[0]
    order = torch.arange(n, device=device)
    total = torch.zeros((), device=device)
    g = generator(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def step(index: torch.Tensor) -> None:
        *inputs, labels = (t.index_select(0, index) for t in data)
        loss = loss_fn(model(*inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total.add_(loss.detach(), alpha=w.batch_size)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # torch's capture recipe: warm up on a side stream, then start from scratch
            step(order[: w.batch_size])
    torch.cuda.current_stream(device).wait_stream(side)
    model.load_state_dict(initial)
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for index in order.split(w.batch_size):
            step(index)

    def run() -> float:
        torch.randperm(n, generator=g, device=device, out=order)
        total.zero_()
        graph.replay()
        return (total / n).item()

    return Runner(run)
