"""The README's demo: train an MLP on scikit-learn's digits with hotloop, then a quick speed check.

    PYTHONPATH=python python bench/demo.py        # or: make demo

Real data, no download: 1797 8x8 images of handwritten digits ship with scikit-learn. The run validates
every epoch, stops early when the validation loss stops improving, prints a line per epoch, saves the loss
curves to bench/out/demo_loss.png, then times hotloop against the plain eager loop on MLP 16-32-1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hotloop
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from bench import report, workloads
from bench.contenders import BASELINE, FUSED, NATIVE_FUSED, select
from bench.harness import measure

OUT = Path(__file__).resolve().parent / "out"


def digits(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, validation) tensors: 80/20 stratified split, features standardised with train statistics."""
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(x_train)  # leaves pixels that are constant in training unscaled

    def tensors(x, y):
        return torch.tensor(scaler.transform(x), dtype=torch.float32), torch.tensor(y, dtype=torch.long)

    return tensors(x_train, y_train), tensors(x_val, y_val)


def train(max_epochs: int = 100, patience: int = 5) -> list[dict]:
    train_data, val_data = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    best = hotloop.best_model("val_loss")
    print(f"digits: {len(train_data[0])} training and {len(val_data[0])} validation images, 10 classes")
    history = hotloop.collect(
        hotloop.pipe(
            hotloop.fit(
                train_data,
                model,
                optimizer,
                loss_fn,
                batch_size=64,
                generator=torch.Generator().manual_seed(0),
            ),
            hotloop.augment(hotloop.evaluate(val_data, metrics={"val_loss": loss_fn, "val_acc": "accuracy"})),
            hotloop.tap(hotloop.print_keys("train_loss", "val_loss", "val_acc", "engine")),
            hotloop.tap(best),
            hotloop.early_stop("val_loss", patience=patience),
            hotloop.take(max_epochs),
        )
    )
    best.load_into(model)
    final = hotloop.evaluate(val_data, metrics={"val_loss": loss_fn, "val_acc": "accuracy"})({"model": model})
    print(
        f"stopped after {len(history)} epochs; best validation loss {final['val_loss']:.4f}, "
        f"accuracy {final['val_acc']:.1%} (weights restored)"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        path = hotloop.plot_history(history, ["train_loss", "val_loss"], OUT / "demo_loss.png", logy=True)
        print(f"loss curves: {path}")
    except ImportError as exc:
        print(f"no loss-curve PNG: {exc}")
    return history


def speed(repetitions: int = 3) -> float | None:
    """Quick benchmark of MLP 16-32-1 (batch 32, 8192 samples, 1 thread); the best hotloop speed-up."""
    torch.set_num_threads(1)
    workload = workloads.mlp16()
    names = ["hotloop graph", "hotloop native", NATIVE_FUSED, "hotloop python", BASELINE, FUSED]
    size = f"batch {workload.batch_size}, {workload.n_samples} samples"
    print(f"\nquick benchmark: {workload.title}, {size}, 1 thread")
    result = measure(workload, select(names), torch.device("cpu"), repetitions=repetitions)
    print(report.table([result]))
    ran = [row for row in result.rows() if row["contender"].startswith("hotloop") and not row["skipped"]]
    if not ran:
        print("no hotloop engine ran: see the reasons above")
        return None
    fastest = max(ran, key=lambda row: row["vs_eager"] or 0.0)
    print(f"\n{fastest['contender']}: {fastest['vs_eager']:.2f}x the steps/s of the faster eager loop")
    return fastest["vs_eager"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--no-bench", action="store_true", help="train only, skip the speed check")
    args = parser.parse_args(argv)
    train(args.max_epochs)
    if not args.no_bench:
        speed()


if __name__ == "__main__":
    main()
