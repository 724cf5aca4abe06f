"""The aot engine's compiled step: the native capture's joint forward+backward graph plus torch.optim's update
(SGD, Adam, AdamW), exported as one function with ``torch.export`` and compiled by AOTInductor into a
``.pt2`` package that C++ runs (``_C.AotStep``), cached on disk.

The package takes ``(params, buffers, optimizer state, scalars, batch)``, updates the parameters, buffers and
optimizer state in place and returns ``(loss, *metrics, *grads)``. Everything that changes from step to step
(the learning rate, the bias corrections of the step count, SGD's first step) comes in as the ``scalars``
tensor, computed by C++ in double as torch.optim computes it; only the update's structure (optimizer kind,
momentum, weight decay, amsgrad, maximize, nesterov) is compiled in. Where the loss is not finite and the
guard is on (``scalars[0] == 1``) the update is not applied, as a plain loop that skips the step.

Inductor reorders and fuses float operations, so the compiled step equals torch.optim's to rounding (about
1e-7 relative per step), not bitwise; ``verify_package`` checks two steps against the traced graph plus the
user's own optimizer class before a package trains.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from ._native import _C
from ._shared import CaptureError
from .op_capture import _compare

FORMAT = 1  # of the package's inputs and outputs; part of the cache key
# Compiles run in this process (a counter the tests read: a cache hit compiles nothing).
COMPILES = 0
_RANDOM_OPS = ("bernoulli", "rand", "normal", "native_dropout", "multinomial", "randperm", "exponential")


@dataclass(frozen=True)
class Update:
    """The update's structure, compiled into the package: the kind and, per parameter (the graph's order),
    its group's flags."""

    kind: str  # "sgd" or "adam"
    momentum: tuple[bool, ...]  # SGD: a momentum buffer
    nesterov: tuple[bool, ...]
    weight_decay: tuple[bool, ...]
    decoupled: tuple[bool, ...]  # AdamW's decoupled weight decay
    amsgrad: bool
    maximize: tuple[bool, ...]

    @property
    def state_lists(self) -> int:
        """Optimizer state tensors per parameter: SGD's momentum buffer, Adam's averages (and max)."""
        if self.kind == "sgd":
            return 1 if any(self.momentum) else 0
        return 3 if self.amsgrad else 2

    @property
    def scalars_per_param(self) -> int:
        return 5 if self.kind == "sgd" else 9  # the layout of csrc/engine/aot_step.cpp

    @property
    def native_kind(self) -> Any:
        return _C.AotUpdate.SGD if self.kind == "sgd" else _C.AotUpdate.Adam


def update_of(optimizer: Optimizer, params: Sequence[torch.Tensor]) -> tuple[Update | None, str | None]:
    """The compiled update for ``optimizer`` stepping ``params`` (the graph's order), or why there is none."""
    kind = type(optimizer)
    if kind not in (SGD, Adam, AdamW):
        return None, f"{kind.__name__} has no compiled update (the aot engine compiles SGD, Adam and AdamW)"
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    missing = [i for i, p in enumerate(params) if id(p) not in group_of]
    if missing:
        return None, "the optimizer does not step every trainable parameter (their .grad would accumulate)"
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        return (
            None,
            "the trainable parameters must share one dtype, float32 or float64, got "
            f"{', '.join(sorted(map(str, dtypes)))}",
        )
    if any(p.device.type != "cpu" for p in params):
        return None, "the aot engine runs on the CPU only (so far)"
    groups = [group_of[id(p)] for p in params]
    if kind is SGD:
        momentum = tuple(float(g["momentum"]) != 0.0 for g in groups)
        if len(set(momentum)) > 1:
            return None, "SGD with momentum in some param groups only has no compiled update"
        return Update(
            "sgd",
            momentum=momentum,
            nesterov=tuple(bool(g["nesterov"]) for g in groups),
            weight_decay=tuple(float(g["weight_decay"]) != 0.0 for g in groups),
            decoupled=tuple(False for _ in groups),
            amsgrad=False,
            maximize=tuple(bool(g["maximize"]) for g in groups),
        ), None
    amsgrad = {bool(g["amsgrad"]) for g in groups}
    if len(amsgrad) > 1:
        return None, f"{kind.__name__} with amsgrad in some param groups only has no compiled update"
    return Update(
        "adam",
        momentum=tuple(True for _ in groups),
        nesterov=tuple(False for _ in groups),
        weight_decay=tuple(float(g["weight_decay"]) != 0.0 for g in groups),
        decoupled=tuple(kind is AdamW or bool(g.get("decoupled_weight_decay", False)) for g in groups),
        amsgrad=amsgrad.pop(),
        maximize=tuple(bool(g["maximize"]) for g in groups),
    ), None


# Layers whose compiled CPU kernels ran slower than the native engine's (bench/, the CNN workload: 10.5 ms
# per step against 7.7): engine="auto" keeps such models native. A rule, never a measurement, so which
# engine runs cannot depend on the machine's load.
_SLOWER_COMPILED = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def slower_compiled(model: nn.Module) -> str | None:
    """Why ``engine="auto"`` does not compile ``model``'s step (it would run slower), or None."""
    for name, module in model.named_modules():
        if isinstance(module, _SLOWER_COMPILED):
            return (
                f"the model has a {type(module).__name__} ({name or 'the model'}), whose compiled CPU step "
                "ran slower than the native one; pass engine='aot' to compile it anyway"
            )
    return None


def random_reason(gm: fx.GraphModule) -> str | None:
    """Why the graph cannot be compiled faithfully: Inductor draws random numbers its own way, not eager's."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(word in str(node.target) for word in _RANDOM_OPS):
            return (
                f"the step draws random numbers ({node.target}, e.g. dropout), which a compiled step draws "
                "differently from eager"
            )
    return None


class _Step(nn.Module):
    """The whole training step as a function of its inputs, for ``torch.export``."""

    def __init__(self, joint: fx.GraphModule, update: Update, num_metrics: int) -> None:
        super().__init__()
        self.joint, self.update, self.num_metrics = joint, update, num_metrics

    def forward(
        self,
        params: list[torch.Tensor],
        buffers: list[torch.Tensor],
        state: list[torch.Tensor],
        scalars: torch.Tensor,
        batch: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        n = len(params)
        out = self.joint(params, buffers, *batch)
        grads, loss, metrics = out[:n], out[n], out[n + 1 : n + 1 + self.num_metrics]
        ok = torch.isfinite(loss) | (scalars[0] == 0)
        per = self.update.scalars_per_param
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            h = [scalars[1 + i * per + j] for j in range(per)]
            mine = [state[k * n + i] for k in range(self.update.state_lists)]
            if self.update.kind == "sgd":
                _sgd(self.update, i, p, g, mine, h, ok)
            else:
                _adam(self.update, i, p, g, mine, h, ok)
        return (loss, *metrics, *grads)


def _sgd(u: Update, i: int, p: torch.Tensor, g: torch.Tensor, state: list[torch.Tensor], h: list, ok) -> None:
    lr, wd, momentum, momentum_now, damp_now = h
    d = -g if u.maximize[i] else g
    if u.weight_decay[i]:
        d = d + wd * p
    if u.momentum[i]:
        (buf,) = state
        new_buf = buf * momentum_now + d * damp_now
        d = d + momentum * new_buf if u.nesterov[i] else new_buf
        buf.copy_(torch.where(ok, new_buf, buf))
    p.copy_(torch.where(ok, p + (-lr) * d, p))


def _adam(
    u: Update, i: int, p: torch.Tensor, g: torch.Tensor, state: list[torch.Tensor], h: list, ok
) -> None:
    lr, wd, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, decay = h
    exp_avg, exp_avg_sq = state[0], state[1]
    d = -g if u.maximize[i] else g
    base = p
    if u.weight_decay[i]:
        if u.decoupled[i]:
            base = p * decay
        else:
            d = d + wd * p
    new_avg = torch.lerp(exp_avg, d, one_minus_beta1)
    new_sq = exp_avg_sq * beta2 + one_minus_beta2 * (d * d)
    second = new_sq
    if u.amsgrad:
        second = torch.maximum(state[2], new_sq)
        state[2].copy_(torch.where(ok, second, state[2]))
    denom = torch.sqrt(second) / bc2_sqrt + eps
    exp_avg.copy_(torch.where(ok, new_avg, exp_avg))
    exp_avg_sq.copy_(torch.where(ok, new_sq, exp_avg_sq))
    p.copy_(torch.where(ok, base + (-step_size) * (new_avg / denom), p))


def example_state(update: Update, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Zero optimizer state in the package's layout (torch.optim's state before a first step)."""
    return [torch.zeros_like(p) for _ in range(update.state_lists) for p in params]


def cache_dir() -> Path:
    """Where packages are kept: ``$HOTLOOP_CACHE_DIR/aot``, else ``~/.cache/hotloop/aot``."""
    root = os.environ.get("HOTLOOP_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "hotloop") / "aot"


def cache_key(joint: fx.GraphModule, update: Update, num_metrics: int, inputs: Sequence[torch.Tensor]) -> str:
    """A hash of what the package computes: the graph's code and constants, the update, the inputs' shapes,
    strides and dtypes, and the torch that compiles it."""
    digest = hashlib.sha256()
    for part in (str(FORMAT), torch.__version__, joint.code, repr(update), str(num_metrics)):
        digest.update(part.encode())
    for name, value in sorted(joint.state_dict(keep_vars=True).items()):
        digest.update(name.encode())
        digest.update(_bytes(value))
    for node in joint.graph.nodes:
        if node.op == "get_attr":
            value = getattr(joint, node.target, None)
            if isinstance(value, torch.Tensor):
                digest.update(_bytes(value))
    for t in inputs:
        digest.update(f"{tuple(t.shape)}{t.stride()}{t.dtype}{t.device.type}".encode())
    return digest.hexdigest()[:32]


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return f"{t.dtype}{tuple(t.shape)}".encode() + flat.view(torch.uint8).numpy().tobytes()


def compiler_missing() -> str | None:
    """Why AOTInductor cannot compile here (no C++ compiler), or None."""
    compiler = os.environ.get("CXX") or torch._inductor.config.cpp.cxx[1] or "c++"
    if shutil.which(compiler) is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        return "no C++ compiler was found (AOTInductor needs one to compile the step)"
    return None


@dataclass
class Compiled:
    path: Path
    cached: bool  # found on disk, not compiled now
    seconds: float  # the compile's wall time (0 for a cache hit)


def export_step(
    joint: fx.GraphModule, update: Update, num_metrics: int, inputs: Sequence[Any]
) -> torch.export.ExportedProgram:
    """``torch.export`` of the whole step (non-strict: the joint graph is already ATen ops)."""
    try:
        return torch.export.export(_Step(joint, update, num_metrics), tuple(inputs), strict=False)
    except Exception as exc:
        raise CaptureError(f"torch.export of the compiled step failed ({type(exc).__name__}: {exc})") from exc


def compile_exported(exported: torch.export.ExportedProgram, path: Path) -> None:
    """AOTInductor's compile into ``path`` (written under a temporary name, then renamed: a reader never
    sees half a package)."""
    global COMPILES
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.pt2")
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
        COMPILES += 1
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def package_for(
    joint: fx.GraphModule,
    update: Update,
    num_metrics: int,
    inputs: Sequence[Any],
    *,
    compile_now: bool,
) -> Compiled | None:
    """The cached package for this step, else (``compile_now``) one compiled now, else None. Raises
    CaptureError with the reason when compiling fails."""
    flat = [t for part in inputs for t in (part if isinstance(part, list) else [part])]
    path = cache_dir() / f"{cache_key(joint, update, num_metrics, flat)}.pt2"
    if path.exists():
        return Compiled(path, cached=True, seconds=0.0)
    if not compile_now:
        return None
    reason = compiler_missing()
    if reason is not None:
        raise CaptureError(reason)
    started = time.perf_counter()
    exported = export_step(joint, update, num_metrics, inputs)
    try:
        compile_exported(exported, path)
    except Exception as exc:
        raise CaptureError(f"AOTInductor failed to compile the step ({type(exc).__name__}: {exc})") from exc
    return Compiled(path, cached=False, seconds=time.perf_counter() - started)


def scalars_for_check(
    update: Update, optimizer: Optimizer, params: Sequence[torch.Tensor], step: int, guard: bool
) -> torch.Tensor:
    """The scalars C++ fills for the window's first step, for a fresh optimizer state at ``step`` (1 or 2)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    values = [1.0 if guard else 0.0]
    for p in params:
        g = group_of[id(p)]
        lr, wd = float(g["lr"]), float(g["weight_decay"])
        if update.kind == "sgd":
            momentum, first = float(g["momentum"]), step == 1
            values += [lr, wd, momentum, 0.0 if first else momentum, 1.0 if first else 1.0 - g["dampening"]]
        else:
            beta1, beta2 = (float(b) for b in g["betas"])
            bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
            values += [
                lr,
                wd,
                1.0 - beta1,
                beta2,
                1.0 - beta2,
                lr / bc1,
                bc2**0.5,
                float(g["eps"]),
                1 - lr * wd,
            ]
    return torch.tensor(values, dtype=torch.float64).to(params[0].dtype)


def verify_package(
    path: Path,
    joint: fx.GraphModule,
    update: Update,
    optimizer: Optimizer,
    params: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    batch: Sequence[torch.Tensor],
    num_metrics: int,
    rtol: float = 1e-4,
) -> None:
    """Two steps of the package against the traced joint graph and a fresh ``type(optimizer)`` with the
    same param groups (torch.optim's own update), from the current weights on ``batch``: raises
    CaptureError where loss, gradients, weights, buffers or optimizer state differ. Touches no user tensor."""
    try:
        runner = torch._inductor.aoti_load_package(str(path))
    except Exception as exc:
        raise CaptureError(f"the compiled package does not load ({type(exc).__name__}: {exc})") from exc
    compiled = [p.detach().clone() for p in params]
    compiled_buffers = [b.detach().clone() for b in buffers]
    state = example_state(update, compiled)
    reference = [p.detach().clone().requires_grad_(True) for p in params]
    reference_buffers = [b.detach().clone() for b in buffers]
    by_id = {id(p): r for p, r in zip(params, reference, strict=True)}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    reference_optimizer = type(optimizer)(groups)
    hint = "the compiled step differs from torch.optim's (a compiler problem or a stale cached package)"
    for step in (1, 2):
        scalars = scalars_for_check(update, optimizer, params, step, guard=True)
        try:
            out = runner(compiled, compiled_buffers, state, scalars, [t.clone() for t in batch])
        except Exception as exc:
            raise CaptureError(f"the compiled package fails to run ({type(exc).__name__}: {exc})") from exc
        with torch.no_grad():
            expected = joint([r.detach() for r in reference], reference_buffers, *[t.clone() for t in batch])
        n = len(params)
        for r, g in zip(reference, expected[:n], strict=True):
            r.grad = g.clone()
        reference_optimizer.step()
        _compare(f"the loss of step {step}", out[0], expected[n], rtol, hint)
        for i, (value, ref) in enumerate(zip(out[1 + num_metrics :], expected[:n], strict=True)):
            _compare(f"gradient {i} of step {step}", value, ref, rtol, hint)
        for i, (value, ref) in enumerate(zip(compiled, reference, strict=True)):
            _compare(f"parameter {i} after step {step}", value, ref.detach(), rtol, hint)
            ref_state = reference_optimizer.state[ref]
            keys = (
                ["momentum_buffer"] if update.kind == "sgd" else ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
            )
            for k, key in enumerate(keys[: update.state_lists]):
                _compare(
                    f"the optimizer's {key} of parameter {i}", state[k * n + i], ref_state[key], rtol, hint
                )
        for i, (value, ref) in enumerate(zip(compiled_buffers, reference_buffers, strict=True)):
            _compare(f"buffer {i} after step {step}", value, ref, rtol, hint)


Inputs = list[Any]  # [params, buffers, state, scalars, batch]


def example_inputs(
    update: Update,
    params: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    batch: Sequence[torch.Tensor],
) -> Inputs:
    """Inputs shaped like the package's, for export and the cache key (copies: export may write them)."""
    scalars = torch.zeros(1 + update.scalars_per_param * len(params), dtype=params[0].dtype)
    return [
        [p.detach().clone() for p in params],
        [b.detach().clone() for b in buffers],
        example_state(update, params),
        scalars,
        [t.clone() for t in batch],
    ]


def _main(argv: Sequence[str]) -> None:
    """``python -m hotloop.aot_compile EXPORTED PACKAGE``: the background compile of ``engine="auto"``."""
    exported, package = argv
    compile_exported(torch.export.load(exported), Path(package))
    shutil.rmtree(Path(exported).parent, ignore_errors=True)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
