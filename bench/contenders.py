"""The contenders, in report order: hotloop's engines, the loops it replaces, and the raw-ops floor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import loops
from .floor import raw_floor
from .lightning_loop import lightning_trainer
from .loops import Data, Runner
from .workloads import Workload

BASELINE = "eager loop"


@dataclass(frozen=True)
class Contender:
    name: str
    setup: Callable[[Workload, Data, torch.device], Runner]
    about: str


CONTENDERS = [
    Contender("hotloop graph", loops.hotloop_engine("graph"), "fit(engine='graph'): CUDA graph replay"),
    Contender("hotloop native", loops.hotloop_engine("native"), "fit(engine='native'): C++ op graph"),
    Contender("hotloop python", loops.hotloop_engine("python"), "fit(engine='python'): Python step"),
    Contender(BASELINE, loops.eager, "fitstream's algorithm: randperm, tensor indexing, plain step"),
    Contender("DataLoader loop", loops.dataloader, "the same step fed by DataLoader(TensorDataset)"),
    Contender("fitstream", loops.fitstream_loop, "fitstream.epoch_stream itself"),
    Contender("torch.compile", loops.compiled, "torch.compile of the step (reduce-overhead on CUDA)"),
    Contender("Lightning", lightning_trainer, "lightning.Trainer.fit on a DataLoader"),
    Contender("raw-ops floor", raw_floor, "the step as bare ATen calls + torch._fused_adam_"),
]
SWEEP = ("hotloop graph", "hotloop native", "hotloop python", BASELINE, "raw-ops floor")


def select(names: list[str] | tuple[str, ...] | None = None) -> list[Contender]:
    """The contenders named (case-insensitive), in report order; all of them for None."""
    if names is None:
        return list(CONTENDERS)
    known = {c.name.lower(): c for c in CONTENDERS}
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; choose from {[c.name for c in CONTENDERS]}")
    wanted = {n.lower() for n in names}
    return [c for c in CONTENDERS if c.name.lower() in wanted]
