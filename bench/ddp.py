"""Data-parallel benchmark: per-step time of 2 gloo ranks, hotloop native vs a DDP eager loop vs one process.

PYTHONPATH=python python bench/ddp.py                 # 2 ranks on loopback, CPU, 1 thread each
PYTHONPATH=python python bench/ddp.py --steps 400 --width 256

Every contender trains the same MLP (SGD with momentum) for --steps optimizer steps after warm-up steps
that are not timed; a rank's per-step time is its wall time over its steps, the row reports the slower
rank. "one process" is hotloop's native engine on the plain model in a single process (no collective);
the sync_every row is local SGD (parameters averaged every N steps), a different algorithm from DDP's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import hotloop  # noqa: E402


def _model(width: int, features: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, 1))


def _data(n: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=g), torch.randn(n, 1, generator=g)


def _native(args, model: nn.Module, data, **options) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    stream = hotloop.fit(data, model, opt, F.mse_loss, batch_size=args.batch, every=args.steps, **options)
    next(stream)  # capture and warm-up window
    started = time.perf_counter()
    event = next(stream)
    elapsed = time.perf_counter() - started
    assert event["engine"] == "native", event["engine"]
    stream.close()
    return elapsed / args.steps


def _eager(args, model: nn.Module, data) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = data
    sampler = DistributedSampler(range(len(x)), shuffle=True, seed=0)

    def run(steps: int) -> None:
        done, epoch = 0, 0
        while done < steps:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
            for start in range(0, len(order), args.batch):
                index = order[start : start + args.batch]
                opt.zero_grad()
                F.mse_loss(model(x[index]), y[index]).backward()
                opt.step()
                done += 1
                if done == steps:
                    return
            epoch += 1

    run(args.steps // 4)
    started = time.perf_counter()
    run(args.steps)
    return (time.perf_counter() - started) / args.steps


def _worker(rank: int, args, store: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    data = _data(args.samples, args.features)
    times = {
        "hotloop native, 2 ranks": _native(args, DDP(_model(args.width, args.features)), data),
        "DDP eager loop, 2 ranks": _eager(args, DDP(_model(args.width, args.features)), data),
        f"hotloop sync_every={args.sync_every}, 2 ranks": _native(
            args, DDP(_model(args.width, args.features)), data, sync_every=args.sync_every
        ),
    }
    torch.save(times, os.path.join(results, f"{rank}.pt"))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--sync-every", type=int, default=16, help="local SGD period of the sync_every row")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    rows = {name: max(r[name] for r in ranks) for name in ranks[0]}
    rows["hotloop native, one process"] = _native(
        args, _model(args.width, args.features), _data(args.samples, args.features)
    )
    print(
        f"MLP {args.features}-{args.width}-1, batch {args.batch} per rank, SGD momentum, "
        f"{args.steps} timed steps, torch {torch.__version__}, 1 thread per process"
    )
    eager = rows["DDP eager loop, 2 ranks"]
    for name, seconds in rows.items():
        print(f"  {name:32s} {seconds * 1e6:9.1f} us/step   {eager / seconds:5.2f}x DDP eager")


if __name__ == "__main__":
    main()
