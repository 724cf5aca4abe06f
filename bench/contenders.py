"""The contenders, in report order: hotloop's engines, the loops it replaces, the compiled whole step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import loops
from .floor import compiled_step
from .jax_loop import jax_scan
from .lightning_loop import lightning_trainer
from .loops import Data, Runner
from .workloads import Workload

BASELINE = "eager loop"
FUSED = "eager loop, fused optimizer"
NATIVE_FUSED = "hotloop native, fused optimizer"
BASELINES = (BASELINE, FUSED)  # ratios are against the faster of these two, per workload
COMPILE_BREAKS = "torch.compile (model + step, graph breaks)"
COMPILE_STEP = "torch.compile (whole step, fullgraph)"
JAX_SCAN = "JAX (jit-ed epoch, lax.scan)"


@dataclass(frozen=True)
class Contender:
    name: str
    setup: Callable[[Workload, Data, torch.device], Runner]
    about: str
    aliases: tuple[str, ...] = ()


CONTENDERS = [
    Contender("hotloop graph", loops.hotloop_engine("graph"), "fit(engine='graph'): CUDA graph replay"),
    Contender("hotloop native", loops.hotloop_engine("native"), "fit(engine='native'): C++ op graph"),
    Contender(
        NATIVE_FUSED,
        loops.hotloop_engine("native", fused=True),
        "fit(engine='native') with the optimizer built fused=True",
        ("native-fused",),
    ),
    Contender(
        "hotloop aot",
        loops.cold_compile(loops.hotloop_engine("aot")),
        "fit(engine='aot'): the whole step compiled by AOTInductor, run from C++ (cold compile: setup time)",
        ("aot",),
    ),
    Contender("hotloop python", loops.hotloop_engine("python"), "fit(engine='python'): Python step"),
    Contender(BASELINE, loops.eager, "fitstream's algorithm: randperm, tensor indexing, plain step"),
    Contender(FUSED, loops.eager_fused, "the eager loop, optimizer built with fused=True", ("eager-fused",)),
    Contender("DataLoader loop", loops.dataloader, "the same step fed by DataLoader(TensorDataset)"),
    Contender("fitstream", loops.fitstream_loop, "fitstream.epoch_stream itself"),
    Contender(
        COMPILE_BREAKS,
        loops.compiled,
        "torch.compile of the eager step function (reduce-overhead on CUDA)",
        ("torch-compile", "compile-breaks"),
    ),
    Contender("Lightning", lightning_trainer, "lightning.Trainer.fit on a DataLoader"),
    Contender(
        COMPILE_STEP,
        compiled_step,
        "functional step (grad_and_value + update) compiled fullgraph=True",
        ("compile-fullgraph", "floor"),
    ),
    Contender(
        JAX_SCAN,
        jax_scan,
        "optional: one jax.jit-ed epoch, lax.scan of gather + forward + backward + optax update",
        ("jax",),
    ),
    Contender("graph floor", loops.graph_floor, "CUDA only: the step's kernels, one CUDA graph per window"),
]
# No compile in the sweeps: one compile per sweep point would double a CPU run's length.
SWEEP = ("hotloop graph", "hotloop native", "hotloop python", BASELINE, FUSED)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def select(names: list[str] | tuple[str, ...] | None = None) -> list[Contender]:
    """The contenders named, in report order; all of them for None.

    Case, spaces and punctuation are ignored (``eager-loop``), a contender may be named by an alias
    (``torch-compile``, ``compile-fullgraph``, ``eager-fused``), and ``hotloop`` names all of hotloop's
    engines.
    """
    if names is None:
        return list(CONTENDERS)
    keys = {c.name: {_key(c.name), *map(_key, c.aliases)} for c in CONTENDERS}
    wanted = {_key(n) for n in names}
    unknown = [n for n in names if _key(n) != "hotloop" and not any(_key(n) in k for k in keys.values())]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; choose from {[c.name for c in CONTENDERS]}")
    return [
        c
        for c in CONTENDERS
        if keys[c.name] & wanted or ("hotloop" in wanted and c.name.startswith("hotloop"))
    ]
