"""Shared fixtures: the plain PyTorch loop every engine is compared against."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn


def plain_loop_losses(
    train_data: Sequence[torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int,
    steps: int,
    every: int | None = None,
    shuffle: bool = True,
    last_label: bool = True,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
    after_backward: Callable[[], object] | None = None,
) -> list[float]:
    """Train like fitstream's epoch_stream (forward, loss, zero_grad, backward, step) for `steps` steps;
    `after_backward` runs between backward and step (gradient clipping).

    Returns the sample-weighted mean loss of each window: each epoch when `every` is None, else each run
    of `every` steps (windows cross epoch ends).
    """
    n = train_data[0].shape[0]
    windows: list[float] = []
    total, samples, in_window, done = 0.0, 0, 0, 0
    while done < steps:
        model.train()
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        chunks = list(order.split(batch_size))
        if drop_last and chunks[-1].numel() < batch_size:
            chunks.pop()
        for index in chunks:
            batch = [t[index] for t in train_data]
            if last_label:
                *inputs, labels = batch
                loss = loss_fn(model(*inputs), labels)
            else:
                loss = loss_fn(model(*batch))
            optimizer.zero_grad()
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            total += loss.item() * index.numel()
            samples += index.numel()
            in_window += 1
            done += 1
            if every is not None and in_window == every:
                windows.append(total / samples)
                total, samples, in_window = 0.0, 0, 0
            if done == steps:
                break
        if every is None:
            windows.append(total / samples)
            total, samples = 0.0, 0
    return windows


def assert_same_state(model: nn.Module, reference: nn.Module, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(
            ours[key], theirs[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )


def assert_same_optimizer_state(
    optimizer: torch.optim.Optimizer, reference: torch.optim.Optimizer, rtol: float = 1e-5, atol: float = 1e-7
) -> None:
    ours, theirs = optimizer.state_dict(), reference.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in ours["state"].items():
        assert state.keys() == theirs["state"][index].keys()
        for name, value in state.items():
            other = theirs["state"][index][name]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(
                    value, other, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
                )
            else:
                assert value == other, name


@pytest.fixture(autouse=True, scope="session")
def _no_aot_compiles(tmp_path_factory: pytest.TempPathFactory):
    """engine="auto" compiles nothing in the suite and finds no package a developer's runs cached
    (tests/test_aot.py sets its own cache and rule)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HOTLOOP_CACHE_DIR", str(tmp_path_factory.mktemp("hotloop-cache")))
    patch.setenv("HOTLOOP_AOT_AFTER", "never")
    yield
    patch.undo()


@pytest.fixture
def twin() -> Callable[[nn.Module], nn.Module]:
    """Deep copy of a freshly built model, so hotloop and the plain loop start from identical weights."""
    return copy.deepcopy


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python that must import this hotloop (and keep LD_PRELOAD etc.)."""
    import os
    from pathlib import Path

    import hotloop

    return dict(os.environ, PYTHONPATH=str(Path(hotloop.__file__).parents[1]))


class TwoInputs(nn.Module):
    """Dense features plus integer ids (an embedding), one classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x) + self.b(ids)))


def mlp(inputs: int = 16, hidden: int = 32, outputs: int = 1) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


# Optional packages some documented functions import; their doctests are skipped where these are missing.
OPTIONAL_PACKAGES = {"matplotlib", "pandas", "tqdm", "tensorboard", "IPython"}
_IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.MULTILINE)


def _optional_packages_used(doctest_name: str) -> set[str]:
    """The optional packages the documented object imports (``hotloop.sinks.collect_pd`` -> {"pandas"})."""
    obj: object = None
    parts = doctest_name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr, None)
        break
    try:
        source = inspect.getsource(obj) if obj is not None and not inspect.ismodule(obj) else ""
    except (OSError, TypeError):
        source = ""
    used = set()
    for name in _IMPORT.findall(source):
        top = "tensorboard" if name == "torch.utils.tensorboard" else name.split(".")[0]
        if top in OPTIONAL_PACKAGES:
            used.add(top)
    return used


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, naming the package, the doctests of functions whose optional package is not installed."""
    for item in items:
        if type(item).__name__ != "DoctestItem":
            continue
        used = _optional_packages_used(item.name)
        missing = sorted(p for p in used if importlib.util.find_spec(p) is None)
        if missing:
            reason = f"the example needs {', '.join(missing)} (not installed)"
            item.add_marker(pytest.mark.skip(reason=reason))
