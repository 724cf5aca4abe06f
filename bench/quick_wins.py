"""The native engine's quick wins, each measured against the step without it, interleaved in one process.

PYTHONPATH=python python bench/quick_wins.py layout            # channels_last vs the user's layout
PYTHONPATH=python python bench/quick_wins.py threads --threads 2  # one thread for tiny windows vs all
PYTHONPATH=python python bench/quick_wins.py reuse             # out= variants into kept outputs vs allocating
PYTHONPATH=python python bench/quick_wins.py mse               # mse_loss against its decomposition

Prints µs per step (median and best of the timed windows) and each contender's ratio (of medians) to the
fused eager loop.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench import loops, workloads
from bench.contenders import Contender
from bench.harness import measure


class ConvBN(nn.Sequential):
    """A CIFAR-sized CNN with BatchNorm: 3x32x32 inputs, 16 and 32 channels."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, classes),
        )  # fmt: skip


class AvgCNN(nn.Sequential):
    """Strided convolutions, 1x1 convolutions and global average pooling: 3x32x32 inputs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
        )  # fmt: skip


def layout_workloads() -> dict[str, workloads.Workload]:
    cnn = workloads.standard()["cnn"]
    cifar = workloads.class_data(3, 32, 32)
    return {
        "cnn": cnn,
        "convbn": replace(cnn, name="convbn", title="CNN with BatchNorm on 3x32x32", make_data=cifar,
                          make_model=ConvBN, steps=16),
        "avgcnn": replace(cnn, name="avgcnn", title="strided + 1x1 CNN, global average pool, 3x32x32",
                          make_data=cifar, make_model=AvgCNN, steps=16),
    }  # fmt: skip


@contextlib.contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


def built_under(
    setup: Callable[..., loops.Runner], context: Callable[[], contextlib.AbstractContextManager]
) -> Callable[..., loops.Runner]:
    """``setup`` whose first window (where the engine is built) runs inside ``context()``."""

    def wrapped(w: workloads.Workload, data: loops.Data, device: torch.device) -> loops.Runner:
        runner = setup(w, data, device)
        first = [True]

        def run() -> float:
            if first[0]:
                first[0] = False
                with context():
                    return runner.run()
            return runner.run()

        return loops.Runner(run, runner.close)

    return wrapped


def layout_contenders() -> list[Contender]:
    native = loops.hotloop_engine
    return [
        Contender("native, user's layout", native("native", memory_format="preserve"), ""),
        Contender("native, auto (channels_last)", native("native", memory_format="auto"), ""),
        Contender("native fused opt, user's layout", native("native", True, memory_format="preserve"), ""),
        Contender("native fused opt, auto", native("native", True, memory_format="auto"), ""),
        Contender("eager loop, fused optimizer", loops.eager_fused, ""),
    ]


def thread_contenders() -> list[Contender]:
    from hotloop import speed_rules

    def all_threads() -> contextlib.AbstractContextManager:
        return patched(speed_rules, "ONE_THREAD_BELOW", 0)

    return [
        Contender("native, all threads", built_under(loops.hotloop_engine("native"), all_threads), ""),
        Contender("native, rule", loops.hotloop_engine("native"), ""),
        Contender(
            "native fused opt, all threads",
            built_under(loops.hotloop_engine("native", True), all_threads),
            "",
        ),
        Contender("native fused opt, rule", loops.hotloop_engine("native", True), ""),
        Contender("eager loop, fused optimizer", loops.eager_fused, ""),
    ]


def reuse_contenders() -> list[Contender]:
    from hotloop import op_capture

    def allocating() -> contextlib.AbstractContextManager:
        return patched(op_capture, "REUSE_OUTPUTS", False)

    return [
        Contender("native, allocating", built_under(loops.hotloop_engine("native"), allocating), ""),
        Contender("native, out= reuse", loops.hotloop_engine("native"), ""),
        Contender(
            "native fused opt, allocating",
            built_under(loops.hotloop_engine("native", True), allocating),
            "",
        ),
        Contender("native fused opt, out= reuse", loops.hotloop_engine("native", True), ""),
        Contender("eager loop, fused optimizer", loops.eager_fused, ""),
    ]


def mse_decomposition(repetitions: int) -> None:
    """``mse_loss`` and its backward (two ATen kernels) against its decomposition ``(p - y).square().mean()``
    (eight ops), both lowered to an OpGraph, loss and gradient of a [32, 1] prediction."""
    import time

    from hotloop import op_capture
    from torch.func import grad_and_value
    from torch.fx.experimental.proxy_tensor import make_fx

    pred, labels = torch.randn(32, 1), torch.randn(32, 1)
    forms = {
        "mse_loss": lambda p, y: nn.functional.mse_loss(p, y),
        "decomposed": lambda p, y: (p - y).square().mean(),
    }
    graphs = {
        name: op_capture.lower(make_fx(grad_and_value(f), tracing_mode="fake")(pred, labels), 2)
        for name, f in forms.items()
    }
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(repetitions):
        for name, graph in graphs.items():
            start = time.perf_counter()
            for _ in range(500):
                graph([pred, labels])
            times[name].append((time.perf_counter() - start) / 500 * 1e6)
    for name, graph in graphs.items():
        print(
            f"  {name:12s} {len(graph.op_names)} ops  "
            f"{statistics.median(times[name]):6.2f} µs per call from Python"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("layout", "threads", "reuse", "mse"))
    p.add_argument("--workloads", help="comma-separated subset")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repetitions", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "mse":
        mse_decomposition(args.repetitions)
        return
    if args.what == "layout":
        chosen, contenders = layout_workloads(), layout_contenders()
    else:
        standard = workloads.standard()
        chosen = {k: standard[k] for k in ("mlp16", "logreg", "mlp784", "cnn")}
        contenders = thread_contenders() if args.what == "threads" else reuse_contenders()
    if args.workloads:
        chosen = {k: chosen[k] for k in args.workloads.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for w in chosen.values():
        result = measure(w, contenders, torch.device("cpu"), repetitions=args.repetitions, log=print)
        base = next(o for o in result.outcomes if o.contender == "eager loop, fused optimizer")
        print(f"{w.title}: batch {w.batch_size}, {w.steps} steps per window")
        for o in result.outcomes:
            if not o.times:
                print(f"  {o.contender:34s} skipped: {o.skipped}")
                continue
            us, best = (statistics.median(o.times) / w.steps * 1e6, min(o.times) / w.steps * 1e6)
            ratio = statistics.median(base.times) / statistics.median(o.times)
            print(
                f"  {o.contender:34s} {us:9.1f} µs/step (best window {best:9.1f})  "
                f"{ratio:5.2f}x the fused eager loop"
            )


if __name__ == "__main__":
    main()
