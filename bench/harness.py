"""Measurement: set every contender up, warm each up, then time interleaved windows; median and min-max.

The first (compiling, capturing, tracing) window of every contender is a warm-up and never timed. Timed
repetitions go round the contenders in turn, starting one further each round, so slow drifts in the
machine's speed hit every contender alike.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

from .contenders import BASELINES, Contender
from .loops import Runner, Skip
from .workloads import Workload


@dataclass
class Outcome:
    """One contender on one workload: window times in seconds, or why there are none."""

    contender: str
    times: list[float] = field(default_factory=list)
    loss: float | None = None  # mean training loss of the last window, to show the work was real
    skipped: str | None = None
    setup_seconds: float | None = None  # set-up plus the first warm-up window (compiling, capturing,
    # tracing): reported apart, never in the timed windows


@dataclass
class Result:
    workload: str
    title: str
    batch_size: int
    steps: int  # optimizer steps per timed window
    param: tuple[str, int] | None
    outcomes: list[Outcome]

    def baseline(self) -> Outcome | None:
        """The faster eager loop (plain or fused optimizer) of those that ran: what ratios are against."""
        ran = [o for o in self.outcomes if o.contender in BASELINES and o.times]
        return min(ran, key=lambda o: statistics.median(o.times), default=None)

    def rows(self) -> list[dict]:
        """Per contender: steps/s and samples/s (median, min, max), ratio to the faster eager loop, loss."""
        base = self.baseline()
        rows = []
        for o in self.outcomes:
            row: dict = {"contender": o.contender, "skipped": o.skipped, "loss": o.loss}
            row["setup_seconds"] = o.setup_seconds
            if o.times:
                median = statistics.median(o.times)
                rate = {
                    "median": self.steps / median,
                    "min": self.steps / max(o.times),
                    "max": self.steps / min(o.times),
                }
                row["steps_per_sec"] = rate
                row["samples_per_sec"] = {k: v * self.batch_size for k, v in rate.items()}
                row["vs_eager"] = statistics.median(base.times) / median if base else None
                row["baseline"] = base.contender if base else None
                row["repetitions"] = len(o.times)
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "outcomes"}, "results": self.rows()}


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(runner: Runner, device: torch.device) -> tuple[float, float]:
    gc.collect()  # cheap: measure() froze everything older than the contenders' set-up
    gc.disable()  # a collection inside one window would charge its cost to whoever runs then
    try:
        synchronize(device)
        start = time.perf_counter()
        loss = runner.run()
        synchronize(device)
        return time.perf_counter() - start, float(loss)
    finally:
        gc.enable()


def _close(runner: Runner) -> None:
    try:
        runner.close()
    except Exception:  # a runner that cannot clean up has nothing more to report
        pass


def measure(
    workload: Workload,
    contenders: Sequence[Contender],
    device: torch.device,
    *,
    repetitions: int,
    warmup: int = 1,
    log: Callable[[str], None] = lambda line: None,
) -> Result:
    """Time ``repetitions`` windows of every contender that sets up and warms up without an error."""
    data = workload.data(device)
    outcomes = [Outcome(c.name) for c in contenders]
    live: list[tuple[Outcome, Runner]] = []
    try:
        for outcome, contender in zip(outcomes, contenders, strict=True):
            began = time.perf_counter()
            try:
                live.append((outcome, contender.setup(workload, data, device)))
                outcome.setup_seconds = time.perf_counter() - began
            except Skip as exc:
                outcome.skipped = str(exc)
            except Exception as exc:
                outcome.skipped = f"setup failed: {describe(exc)}"
        for outcome in outcomes:
            if outcome.skipped:
                log(f"  {outcome.contender}: skipped ({outcome.skipped})")
        gc.collect()
        gc.freeze()
        rounds = [(f"warm-up {i + 1}", False) for i in range(warmup)]
        rounds += [(f"repetition {i + 1}", True) for i in range(repetitions)]
        for number, (stage, timed) in enumerate(rounds):
            shift = number % len(live) if live else 0
            for outcome, runner in live[shift:] + live[:shift]:
                try:
                    seconds, outcome.loss = _timed(runner, device)
                except Exception as exc:
                    outcome.skipped = f"failed in {stage}: {describe(exc)}"
                    outcome.times.clear()
                    log(f"  {outcome.contender}: {outcome.skipped}")
                    _close(runner)
                    continue
                if timed:
                    outcome.times.append(seconds)
                elif number == 0:
                    outcome.setup_seconds = (outcome.setup_seconds or 0.0) + seconds
            live = [(o, r) for o, r in live if o.skipped is None]
    finally:
        gc.unfreeze()
        for _, runner in live:
            _close(runner)
    return Result(
        workload.name, workload.title, workload.batch_size, workload.steps, workload.param, outcomes
    )


def environment(device: torch.device) -> dict:
    """What the numbers depend on: when, where, which torch, how many threads."""
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }
    try:
        import hotloop

        info["hotloop"] = hotloop.__version__
    except Exception as exc:  # the report still runs, and says why hotloop is missing
        info["hotloop"] = f"unavailable ({describe(exc)})"
    info["argv"] = " ".join(sys.argv)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
