"""Per-step cost of each optimizer: native (hotloop.optim) against torch.optim eager, MLP 16-32-1, batch 32.

PYTHONPATH=python python bench/optimizers.py [--repeats 5] [--steps 2000]

Two figures per optimizer, median over repeats, one thread: the optimizer step alone (``handle.step`` on
fixed gradients against ``optimizer.step()`` with the same ``.grad``), and a whole training step
(``fit(engine="native")`` against the plain eager loop: forward, loss, zero_grad, backward, step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import hotloop
import torch
from hotloop.optim import configure_window, finish_window, native_optimizer
from torch import nn

OPTIMIZERS = {
    "SGD(momentum)": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "RMSprop(centered,momentum)": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.9),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-3),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-3),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-3),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-3),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))


def per_step(fn, steps: int, repeats: int) -> float:
    """Median microseconds per call of fn(steps) / steps, after one warm-up call."""
    fn(steps // 10 + 1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(steps)
        times.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(times)


def optimizer_step_only(make, fused: bool, steps: int, repeats: int) -> tuple[float, float]:
    model = mlp()
    params = list(model.parameters())
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    eager = make(params)
    for p, g in zip(params, grads, strict=True):
        p.grad = g

    def eager_steps(n):
        for _ in range(n):
            eager.step()

    native_model = mlp()
    native_params = list(native_model.parameters())
    opt = make(native_params)
    handle, reason = native_optimizer(opt, fused=fused)
    assert reason is None, reason

    def native_steps(n):
        configure_window(handle, opt, native_params)
        for _ in range(n):
            handle.step(grads)
        finish_window(handle, opt)

    return per_step(native_steps, steps, repeats), per_step(eager_steps, steps, repeats)


def training_step(make, steps: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    n = 32 * 64
    x, y = torch.randn(n, 16), torch.randn(n, 1)
    loss_fn = nn.MSELoss()
    model = mlp()
    stream = hotloop.fit((x, y), model, make(model.parameters()), loss_fn, batch_size=32, engine="native")

    def native_steps(k):
        # whole epochs of 64 steps, timed by the stream's own wall clock
        for _ in range(max(1, k // 64)):
            next(stream)

    eager_model = mlp()
    opt = make(eager_model.parameters())

    def eager_steps(k):
        for _ in range(max(1, k // 64)):
            for index in torch.randperm(n).split(32):
                loss = loss_fn(eager_model(x[index]), y[index])
                opt.zero_grad()
                loss.backward()
                opt.step()

    native = per_step(native_steps, steps, repeats) * (steps / (max(1, steps // 64) * 64))
    eager = per_step(eager_steps, steps, repeats) * (steps / (max(1, steps // 64) * 64))
    stream.close()
    return native, eager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; microseconds per step, median of {args.repeats}")
    columns = (
        ("step native", 12),
        ("step eager", 11),
        ("x", 5),
        ("train native", 13),
        ("train eager", 12),
        ("x", 5),
    )
    print(f"{'optimizer':28} " + " ".join(f"{title:>{width}}" for title, width in columns))
    for name, make in OPTIMIZERS.items():
        native, eager = optimizer_step_only(make, True, args.steps, args.repeats)
        train_native, train_eager = training_step(make, args.steps, args.repeats)
        print(
            f"{name:28} {native:12.1f} {eager:11.1f} {eager / native:5.1f} "
            f"{train_native:13.1f} {train_eager:12.1f} {train_eager / train_native:5.1f}"
        )


if __name__ == "__main__":
    main()
