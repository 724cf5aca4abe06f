"""A battery of training recipes a user would write, each run by fit(engine="auto") and by the plain loop.

PYTHONPATH=python python bench/recipes.py [--epochs 3] [--only NAME ...] [--out bench/results/recipes.md]

Per recipe: the engine auto chose, the fallback reason, parity with the plain loop (forward, loss,
zero_grad, backward, [clip], step, [scheduler]) on the same batches from the same weights and RNG state
(largest relative difference of the per-epoch losses, largest absolute difference of the final weights),
and speed: the eager loop's time over fit()'s for the same epochs, after one warm-up epoch each (fit's
capture happens in its warm-up), one thread.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hotloop
import torch
from torch import nn

F = nn.functional


@dataclass
class Recipe:
    name: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple[torch.Tensor, ...]]
    loss: Callable[[], Any]
    optimizer: Callable[[Any], torch.optim.Optimizer] = lambda p: torch.optim.Adam(p, lr=1e-3)
    batch_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)  # fit() options: clip_grad_norm, accumulate
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None


def regression(n=1024, d=16, dtype=torch.float32):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g, dtype=dtype)
        return x, (x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype))

    return make


def classes(n=1024, d=16, k=5):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g)
        return x, (x[:, :k] + 0.5 * torch.randn(n, k, generator=g)).argmax(1)

    return make


def binary(n=1024, d=16):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g)
        return x, (x[:, :1] + 0.5 * torch.randn(n, 1, generator=g) > 0.8).float()

    return make


def tokens(n=1024, length=12, vocab=200, k=4):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (n, length), generator=g)
        return x, (x[:, 0] % k)

    return make


def images(n=512, channels=1, size=12, k=4):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, channels, size, size, generator=g)
        return x, (x.mean((1, 2, 3)) * 10).long().clamp(-2, 1) + 2

    return make


def sequences(n=512, length=10, d=8, k=3):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, length, d, generator=g)
        return x, (x[:, :, 0].sum(1) > 0).long() + (x[:, 0, 1] > 1).long()

    return make


def sklearn_data(name, task):
    def make():
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, name)()
        x = torch.tensor(bunch.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        y = torch.tensor(bunch.target)
        if task == "regression":
            y = ((y - y.mean()) / y.std()).float().unsqueeze(1)
        elif task == "binary":
            y = y.float().unsqueeze(1)
        return x, y

    return make


def mlp(d=16, hidden=64, out=1, *, norm=None, act=nn.ReLU, dropout=0.0, dtype=torch.float32):
    def make():
        layers: list[nn.Module] = [nn.Linear(d, hidden, bias=norm != "batch")]
        if norm == "batch":
            layers.append(nn.BatchNorm1d(hidden))
        elif norm == "layer":
            layers.append(nn.LayerNorm(hidden))
        layers.append(act())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(hidden, hidden), act(), nn.Linear(hidden, out)]
        return nn.Sequential(*layers).to(dtype)

    return make


class FactorizationMachine(nn.Module):
    def __init__(self, fields=12, vocab=200, k=8):
        super().__init__()
        self.linear = nn.Embedding(vocab, 1)
        self.factors = nn.Embedding(vocab, k)
        self.bias = nn.Parameter(torch.zeros(1))
        self.out = nn.Linear(1, 4)

    def forward(self, x):
        v = self.factors(x)
        pairwise = 0.5 * ((v.sum(1) ** 2) - (v**2).sum(1)).sum(1, keepdim=True)
        return self.out(self.linear(x).sum(1) + pairwise + self.bias)


class EmbeddingMean(nn.Module):
    def __init__(self, vocab=200, dim=32, k=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, k))

    def forward(self, x):
        return self.head(self.embed(x).mean(1))


class Bag(nn.Module):
    def __init__(self, vocab=200, dim=32, k=4):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.head = nn.Linear(dim, k)

    def forward(self, x):
        return self.head(self.bag(x))


class Recurrent(nn.Module):
    def __init__(self, kind, d=8, hidden=32, k=3):
        super().__init__()
        self.rnn = kind(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, k)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Encoder(nn.Module):
    def __init__(self, d=8, k=3, layers=1):
        super().__init__()
        self.proj = nn.Linear(d, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)  # dropout=0.1
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(32, k)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)).mean(1))


class AttentionPool(nn.Module):
    def __init__(self, d=8, k=3):
        super().__init__()
        self.proj = nn.Linear(d, 32)
        self.attn = nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True)
        self.head = nn.Linear(32, k)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def cnn1d():
    return nn.Sequential(
        nn.Conv1d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def cnn2d(channels_last=False):
    def make():
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(16 * 9, 4),
        )
        return model.to(memory_format=torch.channels_last) if channels_last else model

    return make


def channels_last_images():
    x, y = images()()
    return x.contiguous(memory_format=torch.channels_last), y


def sequences_channels_first():
    x, y = sequences()()
    return x.transpose(1, 2).contiguous(), y


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD nesterov": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-3),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-3),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-3),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-3),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3, line_search_fn="strong_wolfe"),
}

RECIPES: list[Recipe] = [
    Recipe("MLP ReLU, MSE, SGD", mlp(), regression(), nn.MSELoss, lambda p: torch.optim.SGD(p, lr=0.01)),
    Recipe(
        "MLP LayerNorm GELU dropout, CE, AdamW",
        mlp(out=5, norm="layer", act=nn.GELU, dropout=0.1),
        classes(),
        nn.CrossEntropyLoss,
        OPTIMIZERS["AdamW"],
    ),
    Recipe("MLP BatchNorm, CE, Adam", mlp(out=5, norm="batch"), classes(), nn.CrossEntropyLoss),
    Recipe("MLP SiLU, Huber", mlp(act=nn.SiLU), regression(), nn.HuberLoss),
    Recipe("MLP, SmoothL1", mlp(), regression(), nn.SmoothL1Loss),
    Recipe("MLP, L1", mlp(), regression(), nn.L1Loss),
    Recipe(
        "MLP, CE label_smoothing=0.1", mlp(out=5), classes(), lambda: nn.CrossEntropyLoss(label_smoothing=0.1)
    ),
    Recipe(
        "MLP, BCEWithLogits pos_weight",
        mlp(),
        binary(),
        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0])),
    ),
    Recipe(
        "MLP log_softmax, NLL", lambda: nn.Sequential(mlp(out=5)(), nn.LogSoftmax(1)), classes(), nn.NLLLoss
    ),
    Recipe("MLP float64", mlp(dtype=torch.float64), regression(dtype=torch.float64), nn.MSELoss),
    Recipe("Embedding mean-pool", EmbeddingMean, tokens(), nn.CrossEntropyLoss),
    Recipe("EmbeddingBag mean", Bag, tokens(), nn.CrossEntropyLoss),
    Recipe("Factorization machine", FactorizationMachine, tokens(), nn.CrossEntropyLoss),
    Recipe("Conv1d BatchNorm MaxPool", cnn1d, sequences_channels_first, nn.CrossEntropyLoss),
    Recipe("Conv2d BatchNorm pool dropout", cnn2d(), images(), nn.CrossEntropyLoss),
    Recipe("Conv2d channels_last", cnn2d(channels_last=True), channels_last_images, nn.CrossEntropyLoss),
    Recipe("GRU", lambda: Recurrent(nn.GRU), sequences(), nn.CrossEntropyLoss),
    Recipe("RNN tanh", lambda: Recurrent(nn.RNN), sequences(), nn.CrossEntropyLoss),
    Recipe("LSTM", lambda: Recurrent(nn.LSTM), sequences(), nn.CrossEntropyLoss),
    Recipe(
        "TransformerEncoderLayer (dropout 0.1)",
        Encoder,
        sequences(),
        nn.CrossEntropyLoss,
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    ),
    Recipe(
        "MultiheadAttention pool",
        AttentionPool,
        sequences(),
        nn.CrossEntropyLoss,
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    ),
    *(Recipe(f"MLP, {name}", mlp(), regression(), nn.MSELoss, make) for name, make in OPTIMIZERS.items()),
    Recipe(
        "MLP, clip_grad_norm=1.0",
        mlp(),
        regression(),
        nn.MSELoss,
        OPTIMIZERS["SGD nesterov"],
        options={"clip_grad_norm": 1.0},
    ),
    Recipe("MLP, clip_grad_value=0.1", mlp(), regression(), nn.MSELoss, options={"clip_grad_value": 0.1}),
    Recipe("MLP, accumulate=4", mlp(), regression(), nn.MSELoss, batch_size=8, options={"accumulate": 4}),
    Recipe(
        "MLP, OneCycleLR per step",
        mlp(),
        regression(),
        nn.MSELoss,
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10_000),
    ),
    Recipe(
        "sklearn breast_cancer, logistic",
        lambda: nn.Linear(30, 1),
        sklearn_data("load_breast_cancer", "binary"),
        nn.BCEWithLogitsLoss,
    ),
    Recipe(
        "sklearn diabetes, MLP regression", mlp(10), sklearn_data("load_diabetes", "regression"), nn.MSELoss
    ),
    Recipe(
        "sklearn digits, MLP BatchNorm",
        mlp(64, out=10, norm="batch"),
        sklearn_data("load_digits", "classes"),
        nn.CrossEntropyLoss,
    ),
    Recipe(
        "sklearn digits, MLP BatchNorm, Adam(fused=True)",
        mlp(64, out=10, norm="batch"),
        sklearn_data("load_digits", "classes"),
        nn.CrossEntropyLoss,
        lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    ),
    Recipe(
        "sklearn iris, MLP",
        mlp(4, 16, 3),
        sklearn_data("load_iris", "classes"),
        nn.CrossEntropyLoss,
        batch_size=16,
    ),
    Recipe(
        "sklearn wine, MLP dropout",
        mlp(13, 32, 3, dropout=0.2),
        sklearn_data("load_wine", "classes"),
        nn.CrossEntropyLoss,
        batch_size=16,
    ),
]


def plain_loop(recipe, data, model, optimizer, loss_fn, scheduler, epochs, generator):
    """The loop fit() replaces; returns each epoch's sample-weighted mean loss."""
    *inputs, labels = data
    accumulate = recipe.options.get("accumulate", 1)
    clip_norm, clip_value = recipe.options.get("clip_grad_norm"), recipe.options.get("clip_grad_value")
    closure_needed = isinstance(optimizer, torch.optim.LBFGS)
    losses = []
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for group in torch.randperm(len(labels), generator=generator).split(recipe.batch_size * accumulate):
            if closure_needed:
                first = []

                def closure(group=group, first=first):
                    optimizer.zero_grad()
                    loss = loss_fn(model(*(t[group] for t in inputs)), labels[group])
                    first.append(loss.item())
                    loss.backward()
                    return loss

                optimizer.step(closure)
                total += first[0] * len(group)
                count += len(group)
                continue
            optimizer.zero_grad()
            for index in group.split(recipe.batch_size):
                loss = loss_fn(model(*(t[index] for t in inputs)), labels[index])
                (loss / accumulate if accumulate > 1 else loss).backward()
                total += loss.item() * len(index)
                count += len(index)
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            if clip_value is not None:
                nn.utils.clip_grad_value_(model.parameters(), clip_value)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        losses.append(total / count)
    return losses


def run(recipe: Recipe, epochs: int) -> dict[str, Any]:
    data = recipe.data()
    torch.manual_seed(0)
    model = recipe.model()
    twin = copy.deepcopy(model)
    optimizer, twin_opt = recipe.optimizer(model.parameters()), recipe.optimizer(twin.parameters())
    scheduler = recipe.scheduler(optimizer) if recipe.scheduler else None
    twin_scheduler = recipe.scheduler(twin_opt) if recipe.scheduler else None
    loss_fn = recipe.loss()

    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hotloop.SlowPathWarning)
        stream = hotloop.fit(
            data,
            model,
            optimizer,
            loss_fn,
            batch_size=recipe.batch_size,
            scheduler=scheduler,
            generator=torch.Generator().manual_seed(2),
            **recipe.options,
        )
        started = time.perf_counter()
        events = [next(stream)]  # the warm-up epoch: capture and check included
        warm_fit = time.perf_counter() - started
        started = time.perf_counter()
        events += [next(stream) for _ in range(epochs)]
        fit_time = time.perf_counter() - started
        stream.close()
    reasons = [str(w.message) for w in caught if issubclass(w.category, hotloop.SlowPathWarning)]

    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(2)
    expected = plain_loop(recipe, data, twin, twin_opt, loss_fn, twin_scheduler, 1, generator)
    started = time.perf_counter()
    expected += plain_loop(recipe, data, twin, twin_opt, loss_fn, twin_scheduler, epochs, generator)
    eager_time = time.perf_counter() - started

    got = [e["train_loss"] for e in events]
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, expected, strict=True))
    weight_diff = max(
        (a.double() - b.double()).abs().max().item()
        for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True)
        if a.is_floating_point()
    )
    return {
        "recipe": recipe.name,
        "engine": events[0]["engine"],
        "reason": reasons[0].split(": ", 1)[1] if reasons else "",
        "loss_rel_diff": loss_diff,
        "weight_abs_diff": weight_diff,
        "parity": loss_diff <= 1e-4 and weight_diff <= 1e-3 and all(map(math.isfinite, got)),
        "speedup": eager_time / fit_time,
        "first_epoch_s": warm_fit,
    }


def table(rows: list[dict[str, Any]]) -> str:
    native = sum(r["engine"] == "native" for r in rows)
    slowest = min((r["speedup"] for r in rows if r["engine"] == "native"), default=float("nan"))
    lines = [
        "| recipe | engine | parity (loss rel. diff, weight abs. diff) | speed vs eager | fallback reason |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        parity = (
            "yes" if r["parity"] else "**NO**"
        ) + f" ({r['loss_rel_diff']:.1e}, {r['weight_abs_diff']:.1e})"
        lines.append(f"| {r['recipe']} | {r['engine']} | {parity} | {r['speedup']:.2f}x | {r['reason']} |")
    lines.append("")
    lines.append(
        f"{native}/{len(rows)} recipes ({100 * native / len(rows):.0f}%) run natively; "
        f"{sum(r['parity'] for r in rows)}/{len(rows)} match the plain loop; slowest native recipe "
        f"{slowest:.2f}x the eager loop."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for recipe in RECIPES:
        if args.only and not any(word.lower() in recipe.name.lower() for word in args.only):
            continue
        row = run(recipe, args.epochs)
        rows.append(row)
        print(
            f"{row['recipe']:45} {row['engine']:7} parity={row['parity']} {row['speedup']:.2f}x",
            row["reason"],
            flush=True,
        )
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
