"""The benchmark workloads: synthetic data with a planted teacher, a model, a loss and an optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Workload:
    """One training problem. A timed window is ``steps`` optimizer steps, exactly one epoch.

    ``make_data(n, generator)`` returns CPU tensors (inputs..., labels) with ``n`` samples; the sample
    count is ``batch_size * steps`` so every batch is full and every loop does the same work.
    """

    name: str
    title: str
    make_data: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    make_model: Callable[[], nn.Module]
    make_loss: Callable[[], nn.Module]
    make_optimizer: OptimizerFactory
    batch_size: int
    steps: int
    param: tuple[str, int] | None = None  # (swept quantity, value) for a sweep point

    @property
    def n_samples(self) -> int:
        return self.batch_size * self.steps

    def data(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(1234)
        return tuple(t.to(device) for t in self.make_data(self.n_samples, generator))

    def build(self, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
        """A fresh model (same initial weights every call), its optimizer and the loss, on ``device``."""
        torch.manual_seed(0)
        model = self.make_model().to(device)
        return model, self.make_optimizer(model.parameters()), self.make_loss()


def adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9)


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def regression_data(features: int, hidden: int = 0) -> Callable[[int, torch.Generator], tuple]:
    """y = teacher(x) + noise, the teacher linear or (``hidden`` > 0) a tanh MLP."""

    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, features, generator=g)
        if hidden:
            w1, w2 = torch.randn(features, hidden, generator=g), torch.randn(hidden, 1, generator=g)
            y = torch.tanh(x @ w1 / features**0.5) @ w2 / hidden**0.5
        else:
            y = x @ torch.randn(features, 1, generator=g) / features**0.5
        return x, y + 0.1 * torch.randn(n, 1, generator=g)

    return make


def binary_data(features: int) -> Callable[[int, torch.Generator], tuple]:
    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, features, generator=g)
        logits = x @ torch.randn(features, 1, generator=g) + 0.5 * torch.randn(n, 1, generator=g)
        return x, (logits > 0).float()

    return make


def class_data(*shape: int, classes: int = 10) -> Callable[[int, torch.Generator], tuple]:
    """Gaussian inputs of ``shape`` labelled by a random linear teacher's argmax."""

    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, *shape, generator=g)
        teacher = torch.randn(x[0].numel(), classes, generator=g)
        return x, (x.flatten(1) @ teacher).argmax(1)

    return make


class SmallCNN(nn.Sequential):
    """Two 3x3 conv + max-pool blocks and a linear head for 1x28x28 inputs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 5 * 5, classes),
        )  # fmt: skip


class FactorizationMachine(nn.Module):
    """Rendle's factorization machine over categorical indices into one vocabulary; logits (batch,)."""

    def __init__(self, vocabulary: int, rank: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.linear = nn.Embedding(vocabulary, 1)
        self.factors = nn.Embedding(vocabulary, rank)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.normal_(self.factors.weight, std=0.01)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        v = self.factors(index)  # (batch, fields, rank)
        pairwise = 0.5 * (v.sum(1).square() - v.square().sum(1)).sum(1)
        return self.bias + self.linear(index).sum((1, 2)) + pairwise


def fm_data(vocabulary: int, fields: int, rank: int) -> Callable[[int, torch.Generator], tuple]:
    def make(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(vocabulary, (n, fields), generator=g)
        v = torch.randn(vocabulary, rank, generator=g) / rank**0.5
        e = v[index]
        logits = 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(1)
        return index, (logits > logits.median()).float()

    return make


def mlp16(hidden: int = 32, batch_size: int = 32, steps: int = 256) -> Workload:
    """The native-engine issue's reference: MLP 16-32-1, MSE, Adam, batch 32, 8192 samples."""
    return Workload(
        "mlp16", f"MLP 16-{hidden}-1 regression (MSE, Adam)", regression_data(16, hidden=8),
        lambda: mlp(16, hidden, 1), nn.MSELoss, adam, batch_size, steps,
    )  # fmt: skip


def standard(quick: bool = False) -> dict[str, Workload]:
    """The headline workloads by name. ``quick`` keeps each step's work and shortens the slow windows."""
    cnn_steps, fm_steps = (16, 64) if quick else (64, 128)
    workloads = [
        Workload("linreg", "linear regression 16-1 (MSE, SGD)", regression_data(16),
                 lambda: nn.Linear(16, 1), nn.MSELoss, sgd, 32, 256),
        Workload("logreg", "logistic regression 32-1 (BCE, Adam)", binary_data(32),
                 lambda: nn.Linear(32, 1), nn.BCEWithLogitsLoss, adam, 32, 256),
        mlp16(),
        Workload("mlp784", "MLP 784-256-10 classification (CE, Adam)", class_data(784),
                 lambda: mlp(784, 256, 10), nn.CrossEntropyLoss, adam, 64, 128),
        Workload("cnn", "CNN 2 conv + linear on 1x28x28 (CE, Adam)", class_data(1, 28, 28),
                 SmallCNN, nn.CrossEntropyLoss, adam, 64, cnn_steps),
        Workload("fm", "factorization machine, 8 fields / 1000 ids, rank 8 (BCE, Adam)", fm_data(1000, 8, 8),
                 lambda: FactorizationMachine(1000, 8), nn.BCEWithLogitsLoss, adam, 128, fm_steps),
    ]  # fmt: skip
    return {w.name: w for w in workloads}


def batch_sweep(quick: bool = False) -> list[Workload]:
    """MLP 16-32-1 at growing batch sizes: from launch-bound to compute-bound."""
    sizes, steps = ((8, 64, 512, 4096), 64) if quick else ((8, 32, 128, 512, 2048, 8192), 128)
    title = "MLP 16-32-1 regression (MSE, Adam)"
    return [replace(mlp16(batch_size=b, steps=steps), title=title, param=("batch size", b)) for b in sizes]


def width_sweep(quick: bool = False) -> list[Workload]:
    """MLP 16-W-1 at batch 32 with growing hidden width W."""
    widths, steps = ((8, 128, 2048), 128) if quick else ((8, 32, 128, 512, 2048), 256)
    title = "MLP 16-W-1 regression (MSE, Adam)"
    return [replace(mlp16(hidden=w, steps=steps), title=title, param=("hidden width", w)) for w in widths]
