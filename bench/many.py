"""fit_many's workload: K models trained together, model-steps/s (1 thread, batch 32, Adam; with
``--fused`` every contender's Adam is built ``fused=True``: fused eager steps, fit's fused native kernels,
fit_many's fused per-row kernel).

Contenders: K eager loops (forward, loss, zero_grad, backward, step per model per batch), K sequential
``hotloop.fit`` native runs, and ``hotloop.fit_many`` (one stacked native loop). Warm-up (capture) is not
timed: each contender runs one untimed epoch first.

    PYTHONPATH=python .venv/bin/python bench/many.py [--ks 1 4 16 64] [--workloads mlp cnn] [--fused]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
import warnings

import hotloop
import torch
from torch import nn

BATCH = 32
FUSED = False  # --fused


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


WORKLOADS = {
    "mlp": (
        _mlp,
        lambda g: (torch.randn(1024, 16, generator=g), torch.randn(1024, 1, generator=g)),
        nn.MSELoss(),
    ),
    "cnn": (
        _cnn,
        lambda g: (torch.randn(1024, 1, 8, 8, generator=g), torch.randint(0, 10, (1024,), generator=g)),
        nn.CrossEntropyLoss(),
    ),
}


def _setup(make, k):
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(make())
    return models, [
        torch.optim.Adam(m.parameters(), lr=1e-3 * (1 + i % 4), fused=FUSED) for i, m in enumerate(models)
    ]


def eager(make, data, loss_fn, k, epochs):
    models, opts = _setup(make, k)
    x, y = data
    g = torch.Generator().manual_seed(0)

    def epoch():
        for idx in torch.randperm(len(x), generator=g).split(BATCH):
            xb, yb = x[idx], y[idx]
            for m, o in zip(models, opts, strict=True):
                o.zero_grad()
                loss_fn(m(xb), yb).backward()
                o.step()

    epoch()
    t = time.perf_counter()
    for _ in range(epochs):
        epoch()
    return time.perf_counter() - t


def sequential(make, data, loss_fn, k, epochs):
    models, opts = _setup(make, k)
    streams = [
        hotloop.fit(data, m, o, loss_fn, batch_size=BATCH, generator=torch.Generator().manual_seed(0))
        for m, o in zip(models, opts, strict=True)
    ]
    for s in streams:
        next(s)
    t = time.perf_counter()
    for s in streams:
        for _ in range(epochs):
            next(s)
    return time.perf_counter() - t


def stacked(make, data, loss_fn, k, epochs):
    models, opts = _setup(make, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hotloop.SlowPathWarning)
        s = hotloop.fit_many(
            data, models, opts, loss_fn, batch_size=BATCH, generator=torch.Generator().manual_seed(0)
        )
        next(s)
    t = time.perf_counter()
    for _ in range(epochs):
        event = next(s)
    assert event["engine"] in ("stacked-native", "native"), event["engine"]
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--steps", type=int, default=4000, help="model-steps per contender run (about)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fused", action="store_true", help="every contender's Adam built fused=True")
    args = parser.parse_args()
    global FUSED
    FUSED = args.fused
    torch.set_num_threads(1)
    print(
        f"# fit_many bench, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread, batch {BATCH}, Adam{' (fused=True)' if FUSED else ''}; "
        "model-steps/s"
    )
    print("| workload | K | K eager loops | K sequential fit | fit_many | vs fit | vs eager |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads:
        make, data_fn, loss_fn = WORKLOADS[name]
        data = data_fn(torch.Generator().manual_seed(0))
        steps_per_epoch = -(-len(data[0]) // BATCH)
        for k in args.ks:
            epochs = max(1, args.steps // (k * steps_per_epoch))
            rates = {"eager": 0.0, "sequential": 0.0, "fit_many": 0.0}
            # the machine is shared: contenders interleaved, best of --repeats each
            for _ in range(args.repeats):
                for label, fn in (("eager", eager), ("sequential", sequential), ("fit_many", stacked)):
                    seconds = fn(make, data, loss_fn, k, epochs if label != "eager" else max(1, epochs // 4))
                    used = epochs if label != "eager" else max(1, epochs // 4)
                    rates[label] = max(rates[label], k * steps_per_epoch * used / seconds)
            print(
                f"| {name} | {k} | {rates['eager']:,.0f} | {rates['sequential']:,.0f} "
                f"| {rates['fit_many']:,.0f} | {rates['fit_many'] / rates['sequential']:.1f}x "
                f"| {rates['fit_many'] / rates['eager']:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
