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
    Contender("graph floor", loops.graph_floor, "CUDA only: the step's kernels, one CUDA graph per window"),
]
SWEEP = ("hotloop graph", "hotloop native", "hotloop python", BASELINE, "raw-ops floor")


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def select(names: list[str] | tuple[str, ...] | None = None) -> list[Contender]:
    """The contenders named, in report order; all of them for None.

    Case, spaces and punctuation are ignored (``eager-loop``, ``raw_ops_floor``), and ``hotloop`` names
    all of hotloop's engines.
    """
    if names is None:
        return list(CONTENDERS)
    wanted = {_key(n) for n in names}
    unknown = [n for n in names if _key(n) != "hotloop" and _key(n) not in {_key(c.name) for c in CONTENDERS}]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; choose from {[c.name for c in CONTENDERS]}")
    return [
        c
        for c in CONTENDERS
        if _key(c.name) in wanted or ("hotloop" in wanted and c.name.startswith("hotloop"))
    ]
